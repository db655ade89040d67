"""What may change when a run resumes: one table (``RULES``) for every key of the composed config a checkpoint stores
(``model``, ``data``, ``optim``, ``scheduler``, ``module``, ``seed``, the classes, the whole ``trainer`` and every
callback), and the comparison that applies it (``compare``).

Each key that differs is refused (it would be half-applied: the restored optimizer keeps its learning rate, a schedule
its length, the best-checkpoint record its metric, while the run records the new value), allowed with a line in the log
that says what happens (recorded in the checkpoint's ``resumed`` list and run.json), or free (where and how things are
written or shown). A key one side does not set is compared at the default in force when that side was written: a
checkpoint stores its targets' constructor defaults (``defaults``); one written before that is compared with today's.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from hydra.utils import get_object

REFUSE, LOG, FREE = "refuse", "log", "free"


@dataclass(frozen=True)
class Rule:
    pattern: str  # a flat key (``trainer.max_epochs``), fnmatch-style; a callback by class: ``callbacks(WeightEMA)``, ``...).decay``
    verdict: str
    why: str  # for LOG: what happens from the resume on; for REFUSE: what would be half-applied
    with_val: str | None = None  # the verdict instead where either side has a validation split (val/acc picks the best)
    with_schedule: str | None = None  # the verdict instead where either side has a learning-rate schedule


VALIDATION = "val/acc picks the best checkpoint across the resume, measured one way before and another after"
NUMERICS = "from the resume on; the steps round differently, what trains is the same"
RULES: tuple[Rule, ...] = (
    Rule("seed", REFUSE, "it fixes the split, the order and the augmentation"),
    Rule("classes", REFUSE, "the labels would mean other classes"),
    Rule("model.compile", LOG, f"the net runs compiled or eager as set now {NUMERICS}"),
    Rule("model.fused", LOG, f"the same attention by the kernel set now {NUMERICS}"),
    Rule("model*", REFUSE, "the restored weights belong to the checkpoint's net"),
    Rule("data.data_dir", LOG, "the data is read from the new place; the same images are assumed"),
    Rule("data.root", LOG, "the data is read from the new place; the same images are assumed"),
    Rule("data.eval_batch_size", FREE, "evaluation batches; results are the same"),
    Rule("data.device_resident", FREE, "where the data is held; results are the same"),
    Rule("data*", REFUSE, "the epochs before the resume saw other data"),
    Rule("module.tta_*", LOG, "validation and the test average the views set now", with_val=REFUSE),
    Rule("module*", REFUSE, "the loss of the epochs before the resume was another"),
    Rule("optim*", REFUSE, "the restored optimizer keeps its own settings and state"),
    Rule("scheduler*", REFUSE, "the restored schedule keeps its own shape and length"),
    Rule("trainer.max_epochs", LOG, "training goes on to the new epoch count", with_schedule=REFUSE),
    Rule("trainer.max_steps", LOG, "training stops at the new step count", with_schedule=REFUSE),
    Rule("trainer.max_time", LOG, "training stops at the new time limit"),
    Rule("trainer.min_*", LOG, "training goes on at least to the new minimum"),
    Rule("trainer.precision", LOG, f"the epochs after the resume train in the precision set now {NUMERICS}"),
    Rule("trainer.accelerator", LOG, f"the epochs after the resume train on the device set now {NUMERICS}"),
    Rule("trainer.deterministic", LOG, f"other kernels {NUMERICS}"),
    Rule("trainer.benchmark", LOG, f"other kernels {NUMERICS}"),
    Rule("trainer.devices", LOG, "the effective batch size (data.batch_size x processes) is the new one from the resume on"),
    Rule("trainer.num_nodes", LOG, "the effective batch size (data.batch_size x processes) is the new one from the resume on"),
    Rule("trainer.strategy", LOG, "the processes are run the new way from the resume on"),
    Rule("trainer.limit_val_batches", LOG, "validation reads the new share of the validation split", with_val=REFUSE),
    Rule("trainer.check_val_every_n_epoch", LOG, "the best checkpoint is chosen among the epochs validated, on the new interval"),
    Rule("trainer.val_check_interval", LOG, "the best checkpoint is chosen among the validations, on the new interval"),
    Rule("trainer.limit_test_batches", LOG, "this run's test reads the new share of the test split"),
    Rule("trainer.enable_checkpointing", LOG, "checkpoints are written as set now"),
    Rule("trainer.enable_*", FREE, "what is shown"),
    Rule("trainer.log_every_n_steps", FREE, "how often metrics are logged"),
    Rule("trainer.num_sanity_val_steps", FREE, "a check before training; nothing is trained or recorded"),
    Rule("trainer.default_root_dir", FREE, "where files are written"),
    Rule("trainer.profiler", FREE, "what is measured"),
    Rule("trainer.detect_anomaly", FREE, "what is checked"),
    Rule("trainer.inference_mode", FREE, "how evaluation runs; results are the same"),
    Rule("trainer.limit_predict_batches", FREE, "prediction only"),
    Rule("trainer.model_registry", FREE, "where models are registered"),
    Rule("trainer*", REFUSE, "the epochs before the resume trained another way"),
    Rule("callbacks(ModelCheckpoint).monitor", REFUSE, "the best-checkpoint record carried across the resume was chosen by the old metric"),
    Rule("callbacks(ModelCheckpoint).mode", REFUSE, "the best-checkpoint record carried across the resume was chosen the old way"),
    Rule("callbacks(ModelCheckpoint)", REFUSE, "the best-checkpoint record is what the final test reads"),
    Rule("callbacks(ModelCheckpoint).every_n_epochs", LOG, "the best checkpoint is chosen among epochs on the new interval"),
    Rule("callbacks(ModelCheckpoint)*", FREE, "where and how many checkpoint files are kept"),
    Rule("callbacks(WeightAveraging)*", REFUSE, "the weights validated, checkpointed and tested are the average"),
    Rule("callbacks(StochasticWeightAveraging)*", REFUSE, "the weights tested are the average"),
    Rule("callbacks(GradientAccumulationScheduler)*", REFUSE, "the steps before the resume accumulated another way"),
    Rule("callbacks(BaseFinetuning)*", REFUSE, "the layers trained before the resume were others"),
    Rule("callbacks(EarlyStopping)*", LOG, "training may stop by the early stop as set now; an added one counts from the resume"),
    Rule("callbacks(RngState)", LOG, "the RNG states are restored as set now: without them dropout draws differ from an uninterrupted run's"),
    Rule("callbacks(LearningRateMonitor)*", FREE, "what is logged"),
    Rule("callbacks(LogTestFigures)*", FREE, "what is logged"),
    Rule("callbacks(RunStats)*", FREE, "what is recorded in run.json"),
    Rule("callbacks(StopOnNonFiniteLoss)*", FREE, "a stop on a diverged loss; a finite run trains the same"),
    Rule("callbacks(ProgressBar)*", FREE, "what is shown"),
    Rule("callbacks(ModelSummary)*", FREE, "what is shown"),
    Rule("callbacks(*)*", LOG, "a callback whose effect on training this project does not know runs as set now"),
    Rule("*", REFUSE, "a setting this project does not know"),
)

# The sections a checkpoint stores, compared in this order.
SECTIONS = ("model", "data", "optim", "scheduler", "module", "seed", "classes", "trainer", "callbacks")
# What a checkpoint written before ``defaults`` were stored kept of the trainer: only these are compared with it.
LEGACY_TRAINER_KEYS = ("max_epochs", "accumulate_grad_batches", "gradient_clip_val", "limit_train_batches")
_UNKNOWN = object()


@dataclass
class Changes:
    refused: list[str]  # ``key=the checkpoint's value``
    why: dict[str, list[str]]  # why refused -> the refused ``key=value``s it holds for
    logged: list[str]  # ``key: old -> new: what happens from the resume on``

    def refusal(self) -> str:
        """The refused settings grouped by why: ``optim.lr=0.001 (the restored optimizer keeps ...); seed=42 (...)``."""
        return "; ".join(f"{', '.join(items)} ({why})" for why, items in self.why.items())


def rule_for(keys: list[str], has_val: bool = False, has_schedule: bool = False) -> tuple[str, str]:
    """(verdict, why) of the first rule whose pattern matches one of ``keys`` (a key, or a callback's spellings by
    class), as a validation split or a schedule makes it."""
    rule = next(r for r in RULES if any(fnmatchcase(k, r.pattern) for k in keys))
    if has_val and rule.with_val:
        return rule.with_val, VALIDATION
    if has_schedule and rule.with_schedule:
        return rule.with_schedule, "the restored schedule keeps its length"
    return rule.verdict, rule.why


def constructor_defaults(node: Any) -> dict[str, Any]:
    """The plain-valued parameter defaults of a config node's ``_target_`` (through ``**kwargs`` into base classes):
    what a key the config leaves out trains with, stored so that a later resume compares with these, not today's."""
    target = node.get("_target_") if isinstance(node, dict) else None
    return dict(_target_defaults(target)) if isinstance(target, str) else {}


@functools.cache
def _target_defaults(target: str) -> tuple[tuple[str, Any], ...]:
    try:
        obj = get_object(target)
    except (ImportError, AttributeError, ValueError):
        return ()
    functions = [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)] if isinstance(obj, type) else [obj]
    found: dict[str, Any] = {}
    for function in functions:
        try:
            parameters = inspect.signature(function).parameters
        except (TypeError, ValueError):  # a builtin without a signature
            break
        for name, p in parameters.items():
            if name not in found and p.default is not inspect.Parameter.empty and _is_plain(p.default):
                found[name] = _plain(p.default)
        if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            break
    return tuple((k, v) for k, v in found.items())


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _plain(value: Any) -> Any:
    """Tuples as lists, as a config stores them (``stem_strides=()`` in code, ``[]`` in a config)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _flat(config: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(config, dict) or not config:
        return {prefix: config}
    return {k: v for name, value in config.items() for k, v in _flat(value, f"{prefix}.{name}").items()}


def _classes(node: Any) -> list[str]:
    """A callback's class and its base classes, by name, for the ``callbacks(Name)`` rules."""
    target = str((node or {}).get("_target_"))
    try:
        return [c.__name__ for c in get_object(target).__mro__]
    except Exception:  # noqa: BLE001 - a class that cannot be imported here is judged by its name alone
        return [target.rpartition(".")[2]]


def compare(trained: dict, now: dict) -> Changes:
    """The rules applied to each setting of ``now`` (a run's stored config) that differs from ``trained`` (a
    checkpoint's): each at its value, or where the config leaves it out, at its stored (else today's) default."""
    if "defaults" not in trained:  # written before the whole trainer and the callbacks were stored: compared as then
        now = {k: v for k, v in now.items() if k != "defaults"}
        now["trainer"] = {k: (now.get("trainer") or {}).get(k) for k in LEGACY_TRAINER_KEYS}
    has_val = any((c.get("data") or {}).get("val_size") for c in (trained, now))
    has_schedule = any(c.get("scheduler") is not None for c in (trained, now) if "scheduler" in c)
    changes = Changes([], {}, [])

    def judge(key: str, spellings: list[str], was: Any, is_now: Any, shown_was: str) -> None:
        verdict, why = rule_for(spellings, has_val, has_schedule)
        if verdict == REFUSE:
            changes.refused.append(f"{key}={shown_was}")
            changes.why.setdefault(why, []).append(changes.refused[-1])
        elif verdict == LOG:
            changes.logged.append(f"{key}: {_shown(was)} -> {_shown(is_now)}: {why}")

    for section in SECTIONS:
        if section not in trained:  # a checkpoint from before this section was stored
            continue
        if section != "callbacks":
            _compare_node(section, trained, now, judge)
            continue
        old, new = trained["callbacks"] or {}, now.get("callbacks") or {}
        for name in sorted(set(old) | set(new)):
            key, classes = f"callbacks.{name}", _classes(new.get(name) or old.get(name))
            if name in old and name in new and old[name].get("_target_") == new[name].get("_target_"):
                _compare_node(key, trained, now, judge, classes)
                continue
            before, after = (old.get(name) or {}).get("_target_"), (new.get(name) or {}).get("_target_")
            spellings = [f"callbacks({x})" for x in (*classes, *(_classes(old.get(name)) if before and after else ()))]
            judge(key, spellings, before or "<none>", after or "<none>", before or "<none>")
    return changes


def _node(config: dict, key: str) -> Any:
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _effective(config: dict, key: str, legacy: bool) -> dict[str, Any]:
    """A node's settings, flat: its config's values over its stored defaults (none for a legacy config)."""
    node, defaults = _node(config, key), {} if legacy else (config.get("defaults") or {}).get(key) or {}
    if not isinstance(node, dict):
        return {key: node}
    return {**{f"{key}.{k}": v for k, v in defaults.items() if k not in node}, **_flat(node, key)}


def _compare_node(key: str, trained: dict, now: dict, judge: Any, classes: list[str] | None = None) -> None:
    """Judges each setting of node ``key`` that differs; ``classes``: a callback's, spelled ``callbacks(Name).key``."""
    old, new = _node(trained, key), _node(now, key)
    legacy = "defaults" not in trained
    nodes = isinstance(old, dict) and isinstance(new, dict)
    before = _effective(trained, key, legacy) if nodes else {key: old}
    after = _effective(now, key, "defaults" not in now) if nodes else {key: new}
    written = _flat(old, key) if nodes else before
    for flat_key in sorted(set(before) | set(after)):
        name = flat_key[len(key) + 1 :]
        was = before.get(flat_key, _UNKNOWN)
        if was is _UNKNOWN and "." not in name:  # the checkpoint's run used the constructor's default: was it the same?
            was = constructor_defaults(old).get(name, _UNKNOWN)
        is_now = after.get(flat_key, _UNKNOWN)
        if is_now is _UNKNOWN and "." not in name:
            is_now = constructor_defaults(new).get(name, _UNKNOWN)
        if was is not _UNKNOWN and _plain(was) == _plain(is_now):
            continue
        if flat_key in written:
            shown = f"{written[flat_key]}"
        else:
            shown = "<unset>" if was is _UNKNOWN else f"{_plain(was)!r} (unset there: its default)"
        spellings = [f"callbacks({c}){flat_key[len(key) :]}" for c in classes] if classes else [flat_key]
        judge(flat_key, spellings, was, is_now, shown)


def _shown(value: Any) -> str:
    return "<unset>" if value is _UNKNOWN else str(value)


def settings_that_differ(trained: dict, now: dict) -> list[str]:
    """``key=the checkpoint's value`` for each setting of ``now`` that the rules refuse to change on resume."""
    return compare(trained, now).refused
