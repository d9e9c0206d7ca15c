"""Training: the stage/epoch/step loop (``loop``), one step (``step``), the run's state, interrupts,
the overfitting guard, SAM, tracking, the dry-run plan, ablations. Imports every package below it."""
