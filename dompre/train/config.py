"""The Noisy Student pretraining recipe: every setting, its default and a one-line comment (nanoGPT style).

Read with ``dompre.recipes.load_recipe(path, PretrainRecipe, overrides)``; ``recipes/tcia.yaml`` holds the seed
paper's settings and ``recipes/demo.yaml`` a CPU-sized run on the synthetic cohort. Batch sizes are per process.

Three roles train: the ``teacher`` (iteration 0), every ``student`` (iterations 1..N) and, when enabled, the
``pseudo_pretrain`` stage. The top-level ``optim:`` section is shared by the teacher and the students, ``loss:`` by
all three; a role's section may hold its own ``optim:`` / ``loss:`` with any of the same keys, which override the
shared value for that role only (unset keys inherit)::

    optim: {opt: lookahead_radam, lr: 0.01}   # the teacher and the students
    student:
      optim: {lr: 0.005}                      # the students only; they keep opt from optim:

``pseudo_pretrain`` (another architecture on the pseudo-labels only) keeps its own ``opt``, ``lr``,
``weight_decay`` and ``warmup_epochs`` (default: the paper's SGD), as it always had; only its loss is shared.

A role's effective settings are ``recipe.optim_for(role)`` and ``recipe.loss_for(role)``; a run folder's
``recipe.yaml`` is ``recipe.resolved()``, with every role's ``optim:`` / ``loss:`` written out in full. The nested
form (rather than flat ``student.lr``) keeps one name per setting wherever it appears (``optim.lr``,
``student.optim.lr``), and the keys of the old layout, where ``teacher:`` held the optimizer and loss of every
role, are refused by name (:data:`PretrainRecipe.MOVED`) instead of being read with a new meaning.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from dompre.errors import UserError
from dompre.recipes import PATH


@dataclass(frozen=True)
class DataConfig:
    labeled_store: str = field(default="stores/deeplesion", metadata=PATH)  # SliceStore with labels + split column
    unlabeled_store: str = field(default="stores/tcia", metadata=PATH)  # SliceStore to pseudo-label (labels ignored)
    ontology: str | None = field(default=None, metadata=PATH)  # lesion ontology xlsx/csv: exclusive pairs, parents
    label_class: Literal["all", "bodypart", "type", "attribute"] = "bodypart"  # ontology class to train on
    labels: tuple[str, ...] = ()  # explicit label names (overrides label_class); () = use label_class
    hand_labeled: str | None = field(default=None, metadata=PATH)  # hand_labeled_test_set.json, or None
    train_split: str = "train"  # meta['split'] value of the labeled training rows
    val_split: str = "val"  # rows used to choose per-label thresholds
    test_split: str = "test"  # rows reported as the text-mined test set


@dataclass(frozen=True)
class ModelConfig:
    name: str = "maknet"  # timm architecture of the teacher (any timm model)
    student_name: str | None = None  # architecture of the students (None = same as name; may be larger)
    drop_rate: float = 0.5  # classifier dropout of the students (the teacher trains un-noised: 0)
    drop_path_rate: float = 0.1  # stochastic depth of the students (teacher: 0)
    img_size: int = 256  # inputs are resized to img_size x img_size (the store holds 256 x 256)
    pretrained: bool = False  # load timm's pretrained weights (needs them cached; never downloads in tests)


@dataclass(frozen=True)
class OptimConfig:
    opt: str = "lookahead_radam"  # timm optimizer name (Ranger = lookahead_radam)
    lr: float = 0.01  # peak learning rate (cosine decay, warmup below)
    weight_decay: float = 1e-4  # decoupled weight decay
    warmup_epochs: float = 0.5  # linear warmup length in epochs


@dataclass(frozen=True)
class LossConfig:
    focal_gamma: float = 2.0  # focal loss gamma (0 = weighted BCE)
    max_label_weight: float = 20.0  # cap of the per-label frequency weights (dompre.train.losses.label_weights)
    hard_fraction: float = 0.0  # top-k hard mining: average only this share of the hardest label pairs (0 = off)


def _override_of(shared: type, name: str) -> type:
    """A frozen dataclass with ``shared``'s keys, each ``None`` (= inherit the shared value) by default."""
    hints = typing.get_type_hints(shared)
    cls = dataclasses.make_dataclass(
        name, [(f.name, Optional[hints[f.name]], field(default=None)) for f in dataclasses.fields(shared)],
        frozen=True)
    cls.__module__ = __name__
    cls.__doc__ = f"One role's overrides of the shared ``{shared.__name__}`` keys (None = the shared value)."
    return cls


OptimOverride = _override_of(OptimConfig, "OptimOverride")
LossOverride = _override_of(LossConfig, "LossOverride")


@dataclass(frozen=True)
class TeacherConfig:
    epochs: int = 15  # epochs over the labeled training rows
    batch_size: int = 64  # labeled inputs per step and process
    augment: bool = False  # light augmentation for the teacher too (the paper's teacher is un-noised)
    optim: OptimOverride = OptimOverride()  # the teacher's own optim: keys (unset = the shared optim:)
    loss: LossOverride = LossOverride()  # the teacher's own loss: keys (unset = the shared loss:)


@dataclass(frozen=True)
class PseudoConfig:
    threshold: float = 0.5  # keep a label when its probability > threshold ...
    top_k: int = 15  # ... and it is among the top_k labels of the input
    val_thresholds: bool = False  # also require the teacher's per-label validation threshold (calibrated keep)
    soft: bool = False  # soft targets (teacher probabilities of kept labels) instead of hard 1/0
    unkept: Literal["negative", "soft", "ignore"] = "soft"  # top-k labels not kept: the teacher's probability
    #   (default: +0.014 validation AUC over 0 on the built-in benchmark), 0 (the paper), or unknown (left out of
    #   the loss); labels outside the top-k are 0 in every mode
    balance: bool = False  # per-label balancing: sample inputs of rare pseudo-labels more often
    drop_empty: bool = True  # leave out inputs with no kept label (as Noisy Student drops low-confidence images)
    batch_size: int = 128  # inputs per forward pass while labeling
    chunk_size: int = 4096  # inputs per stored .npy shard (a multiple of batch_size; the unit of resume)


@dataclass(frozen=True)
class StudentConfig:
    labeled_epochs: int = 100  # student length in epochs over the labeled training rows
    labeled_batch: int = 64  # labeled inputs per step and process
    pseudo_batch: int = 64  # pseudo-labeled inputs per step and process
    pseudo_weight: float = 1.0  # weight of the pseudo-labeled loss against the labeled one
    init: Literal["scratch", "teacher"] = "scratch"  # student starts from scratch (paper) or from the teacher
    rotate_degrees: float = 15.0  # random rotation range (noise)
    grayscale_p: float = 0.2  # probability of grayscale (noise: mixes the three slices)
    autocontrast_p: float = 0.3  # probability of auto-contrast (noise)
    crop_scale: tuple[float, float] = (0.6, 1.0)  # random resized crop area range (noise)
    optim: OptimOverride = OptimOverride()  # the students' own optim: keys (unset = the shared optim:)
    loss: LossOverride = LossOverride()  # the students' own loss: keys (unset = the shared loss:)


@dataclass(frozen=True)
class TrainConfig:
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # accelerate mixed precision (GPU: bf16)
    channels_last: bool = False  # channels_last memory format (faster on GPU)
    num_workers: int = 2  # DataLoader workers per process
    augment_on: Literal["cpu", "device"] = "cpu"  # student noise in the loader workers or on the accelerator
    torch_threads: int = 0  # intra-op CPU threads per process (0 = torch's default; 1 on a busy or tiny CPU box)
    checkpoint_every: int = 200  # save_state every N optimizer steps (and at every epoch end)
    log_every: int = 10  # log losses to the trackers every N steps
    progress: bool = True  # tqdm progress bars on the main process


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 128  # inputs per forward pass in evaluation
    thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # candidates chosen per label on val


@dataclass(frozen=True)
class DebugConfig:
    fail_after_steps: int = -1  # raise after this many optimizer steps of fail_stage (resume tests); -1 = never
    fail_stage: str = ""  # stage name to fail in, e.g. 'iter0', 'iter1', 'pseudo0'
    fail_after_chunks: int = -1  # raise after this many pseudo-label chunks of fail_stage


@dataclass(frozen=True)
class PseudoPretrainConfig:
    enabled: bool = False  # after the loop: train `arch` on the final pseudo-labels only, then export it
    arch: str = "vgg16"  # any timm architecture (Virk & Bathula Table 3: VGG16)
    epochs: int = 5  # passes over the pseudo-labeled inputs
    batch_size: int = 64  # pseudo-labeled inputs per step and process
    lr: float = 0.01  # peak learning rate (cosine decay); this stage's optimizer is its own, not optim:
    warmup_epochs: float = 0.5  # linear warmup length in epochs
    opt: str = "sgd"  # timm optimizer name
    weight_decay: float = 5e-4
    drop_rate: float = 0.0  # classifier dropout
    noise: bool = False  # the students' input noise on the pseudo-labeled inputs
    pretrained: bool = False  # start from timm's pretrained weights (must be cached)
    loss: LossOverride = LossOverride()  # this stage's own loss: keys (unset = the shared loss:)


@dataclass(frozen=True)
class PretrainRecipe:
    seed: int = 0  # one seed for everything (accelerate.utils.set_seed)
    output_dir: str = field(default="runs/pretrain", metadata=PATH)  # where the run writes (resumes if present)
    iterations: int = 5  # student iterations after the teacher (paper: 5)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()  # shared by the teacher and the students
    loss: LossConfig = LossConfig()  # shared by the teacher, the students and pseudo_pretrain
    teacher: TeacherConfig = TeacherConfig()
    pseudo: PseudoConfig = PseudoConfig()
    student: StudentConfig = StudentConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    debug: DebugConfig = DebugConfig()
    pseudo_pretrain: PseudoPretrainConfig = PseudoPretrainConfig()

    ROLES: ClassVar[tuple[str, ...]] = ("teacher", "student", "pseudo_pretrain")
    MOVED: ClassVar[dict[str, str]] = {
        **{f"teacher.{k}": f"it set the teacher's and the students' {k}; write optim.{k} (both) or "
                           f"teacher.optim.{k} (the teacher only)"
           for k in ("opt", "lr", "weight_decay", "warmup_epochs")},
        **{f"teacher.{k}": f"it set every role's {k}; write loss.{k} (every role) or teacher.loss.{k} (the "
                           "teacher only)"
           for k in ("focal_gamma", "max_label_weight")},
        "student.lr": "write student.optim.lr (the students only) or optim.lr (the teacher and the students)",
    }  # keys of the old layout -> where they live now (dompre.recipes.load_recipe refuses them with this hint)

    def optim_for(self, role: str) -> OptimConfig:
        """The optimizer settings ``role`` trains with: ``optim:`` with the role's ``optim:`` overrides
        (``pseudo_pretrain``: its own ``opt``, ``lr``, ``weight_decay`` and ``warmup_epochs``)."""
        if self._role(role) == "pseudo_pretrain":
            p = self.pseudo_pretrain
            return OptimConfig(opt=p.opt, lr=p.lr, weight_decay=p.weight_decay, warmup_epochs=p.warmup_epochs)
        return _apply(self.optim, getattr(self, role).optim)

    def loss_for(self, role: str) -> LossConfig:
        """The loss settings ``role`` trains with: ``loss:`` with the role's ``loss:`` overrides."""
        return _apply(self.loss, getattr(self, self._role(role)).loss)

    def resolved(self) -> "PretrainRecipe":
        """This recipe with every role's ``optim:`` / ``loss:`` written out in full (what a run folder keeps):
        it loads back to the same effective settings, and shows them without reading the shared sections."""
        roles = {}
        for role in self.ROLES:
            full = {"loss": LossOverride(**dataclasses.asdict(self.loss_for(role)))}
            if role != "pseudo_pretrain":  # its optimizer keys are its own and already in full
                full["optim"] = OptimOverride(**dataclasses.asdict(self.optim_for(role)))
            roles[role] = dataclasses.replace(getattr(self, role), **full)
        return dataclasses.replace(self, **roles)

    def _role(self, role: str) -> str:
        if role not in self.ROLES:
            raise ValueError(f"role {role!r}: one of {', '.join(self.ROLES)}")
        return role


def _apply(shared, override):
    """``shared`` with the non-None fields of ``override``."""
    return dataclasses.replace(shared, **{k: v for k, v in dataclasses.asdict(override).items() if v is not None})


def check_recipe(recipe: PretrainRecipe, source: str = "recipe") -> None:
    """Stop at once on settings that cannot work; the message names the key and the fix."""
    p, s = recipe.pseudo, recipe.student
    problems = []
    if recipe.iterations < 0:
        problems.append(f"iterations={recipe.iterations} must be >= 0")
    if not 0.0 <= p.threshold < 1.0:
        problems.append(f"pseudo.threshold={p.threshold} must be in [0, 1)")
    if p.top_k < 1:
        problems.append(f"pseudo.top_k={p.top_k} must be >= 1")
    if p.batch_size < 1 or p.chunk_size % p.batch_size:
        problems.append(f"pseudo.chunk_size={p.chunk_size} must be a multiple of pseudo.batch_size={p.batch_size}")
    if s.labeled_batch < 1 or s.pseudo_batch < 0 or recipe.teacher.batch_size < 1:
        problems.append("batch sizes must be >= 1 (student.pseudo_batch may be 0)")
    for role in recipe.ROLES:  # the message names the shared key and the role's override
        loss = recipe.loss_for(role)
        if not 0.0 <= loss.hard_fraction <= 1.0:
            problems.append(f"loss.hard_fraction (or {role}.loss.hard_fraction)={loss.hard_fraction} must be 0 "
                            "(off) or a share in (0, 1]")
        if loss.max_label_weight <= 0:
            problems.append(f"loss.max_label_weight (or {role}.loss.max_label_weight)={loss.max_label_weight} "
                            "must be > 0")
        if loss.focal_gamma < 0:
            problems.append(f"loss.focal_gamma (or {role}.loss.focal_gamma)={loss.focal_gamma} must be >= 0")
    lo, hi = s.crop_scale
    if not 0 < lo <= hi <= 1:
        problems.append(f"student.crop_scale={s.crop_scale} must satisfy 0 < low <= high <= 1")
    if problems:
        raise UserError(f"{source}: " + "; ".join(problems))
