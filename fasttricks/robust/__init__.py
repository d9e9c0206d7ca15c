"""Adversarial attacks: PGD and FGSM-RS (``pgd``), N-FGSM, their seeded noise, and AutoAttack for
evaluation. Imports runtime, recipes, data and models."""
