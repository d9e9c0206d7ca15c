"""The recipe schema: every key a recipe may hold, with its meaning and default (pydantic).

A recipe is data; loading it (files, ``base:``, overrides) is ``loading.py``'s work.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from fasttricks.errors import UserError


class RecipeError(UserError, ValueError):
    """A recipe that cannot be used; the message names the key and what it accepts."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    arch: str = Field("efficientnet_b1", description="timm model name (timm.list_models())")
    weights: str | None = Field(None, description="local weights file to start from (safetensors or a "
                                "torch checkpoint, loaded with weights_only=True); with pretrained, the file of "
                                "that tag's weights, loaded by timm (pretrained_cfg_overlay) instead of the hub")
    pretrained: bool | str | None = Field(
        None, description="start from timm's pretrained weights, loaded as timm loads them (Hugging Face hub, its "
        "cache, HF_HUB_OFFLINE): true for the architecture's default tag, or a tag (ns_jft_in1k or "
        "tf_efficientnet_b1.ns_jft_in1k); the normalisation is the tag's. None/false: random or model.weights")
    drop_rate: float | None = Field(None, ge=0, lt=1, description="classifier dropout; None: timm's default")
    drop_path_rate: float | None = Field(None, ge=0, lt=1, description="stochastic depth; None: timm's default")
    compile: bool | None = Field(None, description="torch.compile the model and the heavy augmentation; null: on "
                                 "CUDA, off on the CPU (where compiling costs more than it saves); false: eager, "
                                 "for debugging. ε and the step size travel as tensors: changing them does not "
                                 "recompile")
    sync_batchnorm: bool = Field(False, description="several processes: batch-norm statistics over the global "
                                 "batch (SyncBatchNorm, GPUs only); False: each process normalises its share")

    @model_validator(mode="after")
    def _check_pretrained(self):
        if isinstance(self.pretrained, str):
            arch, dot, tag = self.pretrained.partition(".")
            if dot and arch != self.arch:
                raise ValueError(f"pretrained {self.pretrained!r} is a tag of {arch}, but model.arch is {self.arch}: "
                                 f"set model.arch={arch} (same keys do not make the same network)")
            if not (tag if dot else arch):
                raise ValueError(f"pretrained {self.pretrained!r}: expected a tag such as ns_jft_in1k")
        return self

    def pretrained_name(self) -> str | None:
        """The timm name to load pretrained weights for (``arch.tag``, or ``arch`` for its default
        tag); None when the model does not start from pretrained weights."""
        if not self.pretrained:
            return None
        if self.pretrained is True:
            return self.arch
        return self.pretrained if "." in self.pretrained else f"{self.arch}.{self.pretrained}"


class DataConfig(Strict):
    workers: int = Field(0, ge=0, description="FFCV decode threads; 0: one per core")
    order: Literal["random", "quasi_random", "sequential"] = Field(
        "random", description="random: seeded and resumable; quasi_random: the same, read in contiguous blocks, "
        "for a beton larger than memory (with os_cache: false; the beton built with --shuffle)")
    os_cache: bool = Field(True, description="let the OS page cache hold the beton (FFCV); False with quasi_random")
    val_resize: int = Field(272, ge=8, description="validation: resize the short side to R (paper: 272)")
    val_crop: int = Field(240, ge=8, description="validation: centre crop C (paper: 240)")
    val_batch_size: int = Field(256, ge=1)
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="random-resized-crop area range (torchvision)")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="random-resized-crop aspect range")
    pixel_scale: float = Field(1.0, gt=0, description="multiplies the heavy augmentation's sizes in pixels (elastic "
                               "alpha, sigma, alpha_affine; cutout's holes): 1 for ImageNet-sized crops, as "
                               "albumentations' defaults assume; the toy overrides set 0.25 (56 px against 224)")

    @model_validator(mode="after")
    def _check(self):
        if self.val_crop > self.val_resize:
            raise ValueError(f"val_crop ({self.val_crop}) cannot exceed val_resize ({self.val_resize})")
        return self


class SamConfig(Strict):
    rho: float = Field(0.05, gt=0, description="radius of the weight perturbation (Foret et al.: 0.05)")
    adaptive: bool = Field(False, description="ASAM (Kwon et al. 2021): the perturbation scaled by |w|")


class OptimizerConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.5, gt=0, description="peak learning rate for the stage's (global) batch size")
    reference_batch: int | None = Field(None, ge=1, description="if set, lr is for this many images and is "
                                        "scaled linearly to the stage's batch size (Goyal et al.)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    nesterov: bool = False
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam/AdamW only")
    weight_decay: float = Field(5e-5, ge=0, description="not applied to norms and biases")
    sam: SamConfig | None = Field(None, description="sharpness-aware minimisation around this optimizer "
                                  "(two forward-backward passes per step); {} for the defaults")


class ScheduleConfig(Strict):
    name: Literal["cosine", "linear", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0, ge=0, description="linear warm-up from warmup_factor x lr")
    warmup_factor: float = Field(0.1, gt=0, le=1)
    final_factor: float = Field(0.0, ge=0, le=1, description="cosine/linear: lr at the end, as a fraction")
    step_epochs: list[int] = Field(default_factory=list, description="step: epochs where lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0)


class ResolutionConfig(Strict):
    """Progressive resizing as in FFCV's ImageNet recipe: ``min`` until ``start_ramp``, a linear
    ramp to ``max`` at ``end_ramp``, rounded to a multiple of ``multiple``."""

    min: int = Field(160, ge=8)
    max: int = Field(192, ge=8)
    start_ramp: int = Field(0, ge=0, description="epoch (0-based, within the stage) where the ramp starts")
    end_ramp: int = Field(0, ge=0, description="epoch where it reaches max")
    multiple: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) cannot exceed max ({self.max})")
        if self.start_ramp > self.end_ramp:
            raise ValueError(f"start_ramp ({self.start_ramp}) cannot come after end_ramp ({self.end_ramp})")
        return self


def _fraction(value: Any) -> Any:
    """Accept ε written as the field writes it: ``8/255``."""
    if isinstance(value, str) and "/" in value:
        num, _, den = value.partition("/")
        try:
            return float(num) / float(den)
        except ValueError:
            return value
    return value


Fraction = Annotated[float, BeforeValidator(_fraction)]


def step_rule(eps: float, steps: int, random_start: bool, method: str = "pgd") -> float:
    """The step size when a recipe gives none, so that it follows ε: Madry et al.'s 2.5·ε/steps, and
    for one step from a random start Wong et al.'s FGSM-RS 1.25·ε (2.5·ε would leave the ball's
    far side in one step and be projected back to its edge); 0 for a random start alone. N-FGSM:
    α = ε (de Jorge et al. 2022)."""
    if method == "n_fgsm":
        return eps
    if steps == 0:
        return 0.0
    if steps == 1 and random_start:
        return 1.25 * eps
    return 2.5 * eps / steps


class GuardConfig(Strict):
    """A guard against catastrophic overfitting (the collapse of one-step adversarial training: robust
    accuracy falls to near zero within an epoch while training goes on). At each epoch's end of the
    stage, robust top-1 under PGD-``steps`` on a fixed, seeded subset of the training set; when it falls
    more than ``drop`` below the stage's best so far, the stage goes back to its previous epoch's
    checkpoint and trains the rest with PGD-``fallback_steps`` (fasttricks/training/guard.py)."""

    images: int = Field(1024, ge=1, description="training images measured (seeded; the same every epoch)")
    steps: int = Field(10, ge=1, description="PGD steps of the measurement (step 2.5·eps/steps, random start)")
    drop: float = Field(0.2, gt=0, le=1, description="a fall of robust top-1 (a fraction: 0.2 = 20 points) below "
                        "the stage's best that counts as a collapse")
    fallback_steps: int = Field(3, ge=1, description="the PGD steps the stage continues with after a collapse")


class AdversarialConfig(Strict):
    """Adversarial training: each batch is replaced by its adversarial version. ``pgd``: PGD (Madry et
    al.), FGSM-RS with one step from a random start; ``n_fgsm``: N-FGSM (de Jorge et al. 2022), one
    signed-gradient step from a noise start larger than ε, no projection (fasttricks/robust/n_fgsm.py)."""

    method: Literal["pgd", "n_fgsm"] = Field("pgd", description="pgd (PGD-k, FGSM-RS with steps 1) or n_fgsm "
                                             "(one step from uniform noise in ±noise_factor·ε, no projection)")
    noise_factor: float = Field(2.0, gt=0, description="n_fgsm: the noise's half-width in units of ε (N-FGSM: 2)")
    norm: Literal["linf", "l2"] = "linf"
    eps: Fraction = Field(8 / 255, gt=0, description="radius in [0, 1] pixel units; '8/255' accepted")
    step_size: Fraction = Field(None, ge=0, description="α per step; '2/255' accepted. Not given (or null): "
                                "a rule of ε, so that changing ε keeps the attack's shape: 2.5·ε/steps (Madry "
                                "et al.), 1.25·ε for one step from a random start (FGSM-RS, Wong et al.)")
    steps: int = Field(3, ge=0, description="0: random start only")
    random_start: bool = True
    eval_mode: bool = Field(True, description="attack with dropout/drop-path off and batch-norm statistics "
                            "untouched (as robustness does)")
    guard: GuardConfig | None = Field(None, description="watch for catastrophic overfitting and fall back to PGD; "
                                      "{} for the defaults (1024 images, PGD-10, a drop of 0.2, PGD-3); None: off")

    def fallback(self) -> AdversarialConfig:
        """The attack a guarded stage continues with after a collapse: PGD-k at the same ε."""
        return AdversarialConfig(norm=self.norm, eps=self.eps, steps=self.guard.fallback_steps,
                                 eval_mode=self.eval_mode)

    @model_validator(mode="before")
    @classmethod
    def _step_from_eps(cls, data: Any) -> Any:
        # Resolved before validation, so that config.yaml records the step the run used; an
        # explicit step stays as written (and is checked against ε in `warnings`).
        if isinstance(data, dict) and data.get("method") == "n_fgsm" and "steps" not in data:
            data = {**data, "steps": 1}  # N-FGSM is one step
        if isinstance(data, dict) and data.get("step_size") is None:
            fields = cls.model_fields
            eps = _fraction(data.get("eps", fields["eps"].default))
            steps = data.get("steps", fields["steps"].default)
            start = data.get("random_start", fields["random_start"].default)
            method = data.get("method", fields["method"].default)
            data = {k: v for k, v in data.items() if k != "step_size"}
            if isinstance(eps, int | float) and isinstance(steps, int) and isinstance(start, bool):
                data["step_size"] = step_rule(float(eps), steps, start, method)
        return data

    @model_validator(mode="after")
    def _n_fgsm(self):
        if self.method == "n_fgsm":
            if self.norm != "linf":
                raise ValueError("method n_fgsm is defined for norm linf (its noise is a box, its step a sign); "
                                 "for L2 use method pgd")
            if self.steps != 1:
                raise ValueError(f"method n_fgsm takes one step (steps: 1), not {self.steps}")
        return self

    def warnings(self, where: str) -> list[str]:
        """What an explicit step does that the user may not mean: a multi-step attack whose step
        exceeds ε (after a change of ε that kept an absolute step, say)."""
        rule = step_rule(self.eps, self.steps, self.random_start, self.method)
        beyond = self.step_size > self.eps * (1 + 1e-6) and abs(self.step_size - rule) > 1e-9
        if self.method == "pgd" and self.steps > 1 and beyond:
            def level(v: float) -> str:
                return f"{v * 255:.3g}/255" if self.norm == "linf" else f"{v:.3g}"
            return [f"{where}: step_size {level(self.step_size)} exceeds eps {level(self.eps)} for a {self.steps}-step "
                    f"attack; leave step_size out for the rule of ε ({level(rule)} = 2.5·eps/steps)"]
        return []


Range = tuple[float, float]


class Op(Strict):
    p: float = Field(0.5, ge=0, le=1, description="per-image probability (albumentations' default 0.5)")


# Each op's defaults are albumentations 1.2.1's (July 2022, the release current in mid-2022;
# 1.3.0 of September 2022 has the same defaults and code for these ops).
# Sizes in pixels are albumentations' pixels, multiplied by data.pixel_scale.
class ShiftScaleRotateConfig(Op):
    shift: float = Field(0.0625, ge=0, lt=1, description="max shift in x and in y (drawn apart), fraction of the "
                         "side (ShiftScaleRotate shift_limit)")
    scale: float = Field(0.1, ge=0, lt=1, description="zoom drawn in 1 ± scale (scale_limit)")
    rotate: float = Field(45, ge=0, le=180, description="max angle in degrees (rotate_limit)")


class ElasticConfig(Op):
    alpha: float = Field(1.0, ge=0, description="displacement field scale, px (ElasticTransform alpha)")
    sigma: float = Field(50.0, gt=0, description="its Gaussian smoothing, px (sigma); at alpha 1, sigma 50 the "
                         "field moves pixels by less than 0.01 px, as albumentations' does")
    alpha_affine: float = Field(50.0, ge=0, description="the random affine first: three points of the central "
                                "square each moved by U(±alpha_affine) px (alpha_affine); the default's main effect")


class BrightnessContrastConfig(Op):
    brightness: float = Field(0.2, ge=0, description="x + beta, beta in ±limit (RandomBrightnessContrast)")
    contrast: float = Field(0.2, ge=0, description="x * alpha, alpha in 1 ± limit")


class MotionBlurConfig(Op):
    kernel: tuple[int, int] = Field((3, 7), description="odd kernel sizes, one drawn per image (MotionBlur "
                                    "blur_limit=7); at most 11 (the line kernels are a table drawn by OpenCV)")

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.kernel
        if not 3 <= lo <= hi <= 11:
            raise ValueError(f"motion_blur.kernel {list(self.kernel)}: need 3 <= min <= max <= 11")
        return self


class CutoutConfig(Op):
    num_holes: int = Field(8, ge=1, description="square holes per image (Cutout num_holes)")
    max_h_size: int = Field(8, ge=1, description="hole height, px (max_h_size; Cutout's holes all have it, "
                            "but at the image's bottom edge)")
    max_w_size: int = Field(8, ge=1, description="hole width, px (max_w_size)")
    fill_value: float = Field(0.0, ge=0, le=1, description="the holes' value, in [0, 1]")


class GaussNoiseConfig(Op):
    var: Range = Field((10.0, 50.0), description="noise variance on the 0-255 scale (GaussNoise var_limit)")


class ISONoiseConfig(Op):
    color_shift: Range = Field((0.01, 0.05), description="hue noise scale (ISONoise)")
    intensity: Range = Field((0.1, 0.5), description="noise strength (ISONoise)")


class AugmentConfig(Strict):
    """The paper's heavy augmentation, each op as albumentations 1.2.1 has it, with its defaults;
    p: 0 turns an op off."""

    shift_scale_rotate: ShiftScaleRotateConfig = ShiftScaleRotateConfig()
    elastic: ElasticConfig = ElasticConfig()
    brightness_contrast: BrightnessContrastConfig = BrightnessContrastConfig()
    motion_blur: MotionBlurConfig = MotionBlurConfig()
    cutout: CutoutConfig = CutoutConfig()
    gauss_noise: GaussNoiseConfig = GaussNoiseConfig()
    iso_noise: ISONoiseConfig = ISONoiseConfig()

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and {"shift", "rotate"} & data.keys():
            raise ValueError("augment.shift and augment.rotate are now one op with one coin, as albumentations' "
                             "ShiftScaleRotate: augment.shift_scale_rotate: {p, shift, scale, rotate}")
        return data


class AugMixConfig(Strict):
    """AugMix (Hendrycks et al. 2020) on the device, after the heavy augmentation and before mixing."""

    width: int = Field(3, ge=1, description="chains mixed per image (AugMix: 3)")
    depth: tuple[int, int] = Field((1, 3), description="ops per chain, drawn per chain in [min, max] (AugMix: "
                                   "1 to 3)")
    severity: float = Field(3.0, ge=0.1, le=10, description="op levels are drawn in [0.1, severity] on a 0-10 scale "
                            "(AugMix's CIFAR code and torchvision: 3; its ImageNet code: 1)")
    alpha: float = Field(1.0, gt=0, description="Dirichlet chain weights and the Beta mixing weight (AugMix: 1)")
    jsd: bool = Field(False, description="Jensen-Shannon consistency loss (timm's JsdCrossEntropy): the clean batch "
                      "and two AugMix views go through the network, 3x the images; not with mixing or adversarial")
    jsd_weight: float = Field(12.0, ge=0, description="the JSD term's weight (AugMix and timm: 12)")

    @model_validator(mode="after")
    def _check(self):
        if not 1 <= self.depth[0] <= self.depth[1]:
            raise ValueError(f"depth {list(self.depth)}: need 1 <= min <= max")
        return self


class MixingConfig(Strict):
    kind: Literal["cutmix", "foreground_cutmix"]
    p: float = Field(0.5, ge=0, le=1, description="probability of mixing")
    per_sample: bool = Field(True, description="one coin per image; False: one per batch")
    alpha: float = Field(1.0, gt=0, description="cutmix: box area ~ 1 - Beta(alpha, alpha) (Yun et al.)")
    fg_area: Range = Field((0.1, 0.5), description="foreground_cutmix: area of the pasted part, fraction of the image")
    fg_ratio: Range = Field((3 / 4, 4 / 3), description="foreground_cutmix: its aspect ratio range")
    fg_resize: Range = Field((1.0, 1.0), description="foreground_cutmix: its scale factor before pasting")


class AverageConfig(Strict):
    """Weight averaging at the end of a stage (Izmailov et al.): the uniform mean of some of the
    stage's epoch checkpoints (``last`` or ``epochs``) or an exponential moving average of the
    weights over its steps (``ema_decay``, timm's ModelEmaV3); then the running statistics of
    every batch norm that is not frozen are recomputed on training batches."""

    last: int | None = Field(None, ge=1, description="average the last k epoch checkpoints of the stage")
    epochs: list[int] | None = Field(None, min_length=1, description="or these epochs (1-based, in the stage)")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="or an EMA of the weights, updated every step")
    bn_batches: int = Field(100, ge=0, description="training batches for the batch-norm statistics (capped at "
                            "one epoch); 0 keeps the averaged statistics")

    @model_validator(mode="after")
    def _check(self):
        chosen = [k for k in ("last", "epochs", "ema_decay") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(f"average takes exactly one of last, epochs, ema_decay (got {chosen or 'none'})")
        return self


class StageConfig(Strict):
    name: str = "train"
    epochs: int = Field(16, ge=1)
    batch_size: int = Field(256, ge=1, description="global: all processes together; each takes batch_size / "
                            "world size (the lr is for this batch, so adding GPUs changes neither)")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0, description="max gradient norm; None: no clipping")
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    resolution: ResolutionConfig = ResolutionConfig()
    weights: str | None = Field(None, description="start this stage from a weights file (ours, timm, or a "
                                "MadryLab robustness checkpoint); None: from the previous stage / model.weights")
    freeze: Literal["first_half"] | list[str] | None = Field(
        None, description="first_half: stem + first half of the blocks, batch norms included; or module-name "
        "prefixes; frozen parameters get no gradient and frozen batch norms stay in eval mode")
    adversarial: AdversarialConfig | None = Field(None, description="PGD adversarial training; None: off")
    augment: AugmentConfig | None = Field(None, description="heavy augmentation on the device; None: off")
    augmix: AugMixConfig | None = Field(None, description="AugMix on the device; None: off")
    mixing: MixingConfig | None = Field(None, description="CutMix or Foreground-CutMix; None: off")
    average: AverageConfig | None = Field(None, description="weight averaging at the stage's end; None: off")

    @model_validator(mode="after")
    def _check_jsd(self):
        if self.augmix is not None and self.augmix.jsd:
            clash = [k for k in ("mixing", "adversarial") if getattr(self, k) is not None]
            if clash:
                raise ValueError(f"augmix.jsd puts the clean batch and two views through the network; it does not "
                                 f"combine with {' or '.join(clash)} here: set augmix.jsd=false or remove {clash[0]}")
        return self

    @model_validator(mode="after")
    def _check_average(self):
        a = self.average
        if a is not None and a.last is not None and a.last > self.epochs:
            raise ValueError(f"average.last ({a.last}) exceeds the stage's {self.epochs} epochs")
        if a is not None and a.epochs is not None and not all(1 <= e <= self.epochs for e in a.epochs):
            raise ValueError(f"average.epochs {a.epochs} must lie in 1..{self.epochs} (the stage's epochs)")
        return self

    def peak_lr(self) -> float:
        """The optimizer's lr for this stage's global batch (see OptimizerConfig.reference_batch)."""
        ref = self.optimizer.reference_batch
        return self.optimizer.lr * (self.batch_size / ref if ref else 1.0)

    def averaged_epochs(self) -> list[int]:
        """The 1-based epochs whose checkpoints the stage averages (empty for EMA or none)."""
        if self.average is None or self.average.ema_decay is not None:
            return []
        if self.average.epochs is not None:
            return sorted(set(self.average.epochs))
        return list(range(self.epochs - self.average.last + 1, self.epochs + 1))


def resize_crop(text: str) -> tuple[int, int]:
    """``"324/288"`` as (resize, crop), with 8 <= crop <= resize."""
    try:
        resize, crop = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"expected RESIZE/CROP such as 324/288, not {text!r}") from None
    if not 8 <= crop <= resize:
        raise ValueError(f"{text!r}: need 8 <= CROP <= RESIZE")
    return resize, crop


def _size_range(value: Any) -> Any:
    """Test sizes as written on the command line or in a recipe: ``"224:416:16"`` (crops 224, 240,
    ..., 416, the stop included, resized at the training ratio), ``"324/288"`` (resize/crop pairs),
    or a comma-separated mix; a list of such items or of crops."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        return value
    out: list[int | str] = []
    for item in value:
        if isinstance(item, str) and ":" in item:
            try:
                start, stop, step = (int(v) for v in item.split(":"))
            except ValueError:
                raise ValueError(f"sizes: expected START:STOP:STEP such as 224:416:16, not {item!r}") from None
            if step <= 0 or stop < start:
                raise ValueError(f"sizes {item!r}: need STEP > 0 and STOP >= START")
            out += list(range(start, stop + 1, step))
        elif isinstance(item, str) and "/" in item:
            try:
                resize, crop = resize_crop(item)
            except ValueError as e:
                raise ValueError(f"sizes: {e}") from None
            out.append(f"{resize}/{crop}")
        else:
            out.append(int(item))
    return out


class FixResFineTuneConfig(Strict):
    """FixRes' second step (Touvron et al.): at the chosen test size, train only the classifier and
    the batch-norm layers (statistics and affine) for a few hundred steps."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0, description="Adam, constant")


FIXRES_SPLITS = ("val", "val_clutter")  # the splits whose top-1 can pick the FixRes test size


class FixResConfig(Strict):
    """After training: accuracy at each test crop (resize keeps the training crop/resize ratio),
    the curve saved as fixres.csv / fixres.png, the best size used for the final evaluation and
    stored with the model."""

    sizes: Annotated[list[int | str] | None, BeforeValidator(_size_range)] = Field(
        None, min_length=1, description="test sizes: crops (resized at the training ratio) as a list or "
        "START:STOP:STEP (stop included), and/or RESIZE/CROP pairs such as 324/288 (the 2022 entries'); None: "
        "crops from 0.8x to 1.75x the training test crop (192:416:16 for 240)")
    metric: Literal[FIXRES_SPLITS] = Field("val", description="the split whose top-1 picks the size. A Brain-Score "
                                           "benchmark picks it after training: fasttricks fixres RUN --metric "
                                           "brainscore:ID")
    held_out: bool = Field(True, description="pick on one half of each split (even-numbered images) and report "
                           "the chosen size on the other half, so the reported figure is not the maximum of the "
                           "curve it was picked from")
    finetune: FixResFineTuneConfig | None = Field(None, description="FixRes' classifier + BN fine-tuning; None: off")

    @field_validator("metric", mode="before")
    @classmethod
    def _not_a_benchmark(cls, metric: Any) -> Any:
        # A benchmark in the recipe would end a long run on a download (or its failure) on every
        # rank; after training, `fasttricks fixres` scores the saved model and can be re-run alone.
        if isinstance(metric, str) and metric.startswith("brainscore:"):
            raise ValueError(f"{metric}: a Brain-Score benchmark picks the test size after training, not in "
                             f"the recipe: fasttricks fixres RUN --metric {metric}")
        return metric


class AutoAttackConfig(Strict):
    """The final model's robust accuracy under AutoAttack (fasttricks/robust/autoattack.py), beside PGD's."""

    norm: Literal["linf", "l2"] = "linf"
    eps: Fraction = Field(4 / 255, gt=0, description="radius in [0, 1] pixel units; '4/255' accepted")
    images: int | None = Field(None, ge=1, description="a seeded subset of this many images per split "
                               "(RobustBench reports 1,000 or 5,000 of ImageNet's val); None: every image")
    version: Literal["standard"] = Field("standard", description="torchattacks' standard AutoAttack: APGD-CE, "
                                         "APGD-T, FAB-T, Square")
    splits: list[Literal["val", "val_clutter"]] = Field(["val"], min_length=1, description="the splits attacked "
                                                         "(RobustBench: ImageNet's val)")

    @model_validator(mode="after")
    def _installed(self):
        # checked with the recipe, before hours of training end in a missing package
        if importlib.util.find_spec("torchattacks") is None:
            raise ValueError("AutoAttack needs the torchattacks package: pip install --no-deps torchattacks==3.5.1 "
                             "(--no-deps: its requests~=2.25 pin is for downloads it never imports)")
        return self


class EvaluationConfig(Strict):
    every: int = Field(1, ge=1, description="evaluate every K epochs; a stage's last epoch, its averaged model "
                       "and the final model are always evaluated")
    attack: AdversarialConfig | None = Field(None, description="robust accuracy of the final model under this "
                                             "PGD attack (fp32); None: clean only")
    autoattack: AutoAttackConfig | None = Field(None, description="also robust accuracy of the final model under "
                                                "AutoAttack (needs torchattacks); None: not run")


class LoggingConfig(Strict):
    tensorboard: bool = Field(False, description="event files under RUN/tb/: scalars at the logging points, "
                              "metrics per epoch (needs the tensorboard package: pip install fasttricks[tensorboard])")
    wandb: bool = Field(False, description="the same to Weights & Biases when wandb is installed (WANDB_MODE=offline "
                        "works without network)")

    @model_validator(mode="after")
    def _check(self):
        # checked with the recipe, before a run folder is touched
        for key, package, hint in (("tensorboard", "tensorboard", "pip install 'fasttricks[tensorboard]'"),
                                   ("wandb", "wandb", "pip install wandb")):
            if getattr(self, key) and importlib.util.find_spec(package) is None:
                raise ValueError(f"logging.{key}: true needs the {package} package ({hint})")
        return self


class Recipe(Strict):
    name: str
    description: str = ""
    seed: int = Field(0, ge=0, description="every random draw of a run is a function of it")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    stages: Annotated[list[StageConfig], Field(
        min_length=1, description="the stages in order. In a recipe with base: (and in --override files and "
        "--set), a list merges item by item into the base's stages and must have as many items; "
        "{0: {...}} patches one stage, {'*': {...}} every stage")]
    fixres: FixResConfig | None = Field(None, description="test-resolution sweep after training; None: off")
    evaluation: EvaluationConfig = EvaluationConfig()
    logging: LoggingConfig = LoggingConfig()
    paper: dict[str, float] = Field(default_factory=dict, description="the paper's figures for this recipe "
                                    "(shown beside ours by `fasttricks ablate`); not inherited through base:, "
                                    "as description is not: only the file that names them has them")
    start: Literal["scratch", "trained"] = Field(
        "scratch", description="trained: the recipe fine-tunes a trained model (Table 1, winner-resnet50) and "
        "refuses to run from random weights: give model.weights, model.pretrained or the first stage's weights")
    toy_override: str | None = Field(None, description="the override (relative to pipelines/) that makes this "
                                     "recipe run on the toy set on a CPU in minutes; `train --data toy` applies it "
                                     "when no --override is given. None: overrides/toy.yaml")

    # What loading said about this recipe (overrides that changed experiment keys, keys the user's own
    # file kept); not part of the recipe, so not dumped to config.yaml.
    _notes: list[str] = PrivateAttr(default_factory=list)

    def notes(self) -> list[str]:
        """Lines to show before training: what the overrides changed in the experiment, the user's
        keys that won over them, and steps that exceed ε."""
        lines = list(self._notes)
        for i, stage in enumerate(self.stages):
            if stage.adversarial is not None:
                lines += stage.adversarial.warnings(f"stages.{i}.adversarial")
        if self.evaluation.attack is not None:
            lines += self.evaluation.attack.warnings("evaluation.attack")
        return lines

    def check_start(self) -> None:
        """A fine-tuning recipe without a model to fine-tune would train from random weights and
        report a result that means nothing; refuse it before any folder is written."""
        if self.start == "trained" and not (self.model.weights or self.model.pretrained or self.stages[0].weights):
            raise RecipeError(f"recipe {self.name} fine-tunes a trained model: give it with --set model.weights=FILE "
                              f"(ours, timm's or a robustness checkpoint), --set model.pretrained=TAG, or "
                              f"--set start=scratch to train from random weights on purpose")

    def stage_starts(self) -> list[int]:
        """Epochs of the whole run before each stage (the x of its first epoch is this plus one)."""
        return [sum(s.epochs for s in self.stages[:i]) for i in range(len(self.stages))]

    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)


