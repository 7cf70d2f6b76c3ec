"""``attnsteer recipes list | show | validate | pull | push``."""

from __future__ import annotations

import sys

from .. import models
from ._common import EXIT_OK, EXIT_USAGE, CLIError, Parser, check_writable, missing_subcommand, subparser


def add_recipes(sub) -> None:
    parser = subparser(
        sub,
        "recipes",
        "list, show, validate and share steering recipes",
        "attnsteer recipes list",
        description="List the built-in recipes, show one resolved, validate a recipe file, or share one through "
        "the Hugging Face Hub (pull / push).",
    )
    parser.set_defaults(func=lambda args: missing_subcommand(parser))
    rsub = parser.add_subparsers(
        title="recipes commands", metavar="{list,show,validate,pull,push}", parser_class=Parser
    )

    p = subparser(
        rsub,
        "list",
        "table of the built-in recipes",
        "attnsteer recipes list",
        description="One line per built-in recipe: its name, methods and the first sentence of its description, "
        "shortened to the line width ($COLUMNS, else the terminal's width; 80 when the output is not a terminal). "
        "`attnsteer recipes show NAME` prints the full description, source, parameters and citation.",
    )
    p.set_defaults(func=cmd_recipes_list)

    p = subparser(
        rsub,
        "show",
        "print a recipe as resolved YAML (defaults filled in) with its hash",
        "attnsteer recipes show act-default",
    )
    p.add_argument(
        "recipe", metavar="NAME_OR_PATH", help="built-in name, YAML file, folder with recipe.yaml or hub repo"
    )
    p.set_defaults(func=cmd_recipes_show)

    p = subparser(
        rsub,
        "validate",
        "check a recipe file (exit 0 valid, 2 invalid)",
        "attnsteer recipes validate my-recipe.yaml --model smollm2",
        needs="a recipe file, e.g. from `attnsteer recipes show act-default > my-recipe.yaml`",
        description="Check a recipe's schema; with --model also resolve its layers and heads on that model.",
    )
    p.add_argument("recipe", metavar="PATH", help="YAML file (or built-in name, folder, hub repo)")
    p.add_argument("--model", default=None, help="also resolve layers/heads against this model (id, folder or smollm2)")
    p.add_argument("--model_args", default=None, help="key=value,... e.g. dtype=bfloat16,device=cpu")
    p.set_defaults(func=cmd_recipes_validate)

    p = subparser(
        rsub,
        "pull",
        "download a recipe from the Hugging Face Hub, validate it and save it locally",
        "attnsteer recipes pull me/my-act --out my-act",
        needs="the network and a recipe repo on the Hub",
        description="Download recipe.yaml from a Hub repo (or the local Hugging Face cache), validate it and write "
        "it, unchanged, to a local folder; then use the folder as --recipe. Needs the network unless the file is "
        "cached.",
    )
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub repo id: owner/name or hf://owner/name")
    p.add_argument("--revision", default=None, help="branch, tag or commit of the repo (default: main)")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder to write recipe.yaml into (default: ./NAME, NAME the repo's name); a path ending in .yaml "
        "writes that file",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing, different recipe file (or a file it carries) at --out",
    )
    p.set_defaults(func=cmd_recipes_pull)

    p = subparser(
        rsub,
        "push",
        "validate a recipe and upload it to a Hugging Face Hub repo as recipe.yaml",
        "attnsteer recipes push my-act.yaml me/my-act --private",
        needs="the network and a Hub write token",
        description="Validate a recipe and upload it as recipe.yaml to a Hub model repo (created if missing); the "
        "commit message records the recipe's hash. Needs the network and a write token (`hf auth login` or "
        "HF_TOKEN).",
    )
    p.add_argument("recipe", metavar="RECIPE", help="YAML file, folder with recipe.yaml, or built-in name")
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub repo id to push to: owner/name or hf://owner/name")
    p.add_argument(
        "--private", action="store_true", help="create the repo private (an existing repo keeps its setting)"
    )
    p.set_defaults(func=cmd_recipes_push)


LIST_WIDTH = 80  # `recipes list` line width when stdout is not a terminal and COLUMNS is unset
LIST_MIN_WIDTH = 60


def list_width() -> int:
    """Width of `recipes list` lines: $COLUMNS if set, else the terminal's width, else 80; at least 60."""
    import os
    import shutil

    env = os.environ.get("COLUMNS", "").strip()
    if env.isdigit():
        width = int(env)
    elif sys.stdout.isatty():
        width = shutil.get_terminal_size((LIST_WIDTH, 24)).columns
    else:
        width = LIST_WIDTH
    return max(LIST_MIN_WIDTH, width)


def cmd_recipes_list(args) -> int:
    import attnsteer

    from ..console import one_line

    rows = []  # (name, methods, full description)
    for name in attnsteer.builtin_names():
        try:
            recipe = attnsteer.load_recipe(name)
        except attnsteer.AttnsteerError as exc:
            rows.append((name, "?", f"INVALID: {exc}"))
            continue
        rows.append((name, ",".join(dict.fromkeys(recipe.methods)), recipe.description or "-"))
    name_w = max([len("NAME")] + [len(r[0]) for r in rows])
    meth_w = max([len("METHODS")] + [len(r[1]) for r in rows])
    desc_w = max(12, list_width() - name_w - meth_w - 4)
    print(f"{'NAME':<{name_w}}  {'METHODS':<{meth_w}}  DESCRIPTION")
    for name, methods, desc in rows:  # one line each; `recipes show NAME` has the full text
        print(f"{name:<{name_w}}  {methods:<{meth_w}}  {one_line(desc, desc_w)}".rstrip())
    print(f"\n{len(rows)} built-in recipes. Full details: attnsteer recipes show NAME")
    return EXIT_OK


def resolved_yaml(recipe) -> str:
    """The recipe as YAML with every default written out; layers that come from the method's
    default are marked with a comment (the file as written leaves them out)."""
    import yaml

    from ..methods import METHODS

    data = recipe.to_dict()
    filled = {}
    for i, iv in enumerate(data["interventions"]):
        if "layers" not in iv:
            marker = f"__attnsteer_default_layers_{i}__"
            filled[marker] = METHODS[iv["method"]].default_layers
            # keep the usual key order: method, layers, heads, params
            data["interventions"][i] = {
                "method": iv["method"],
                "layers": marker,
                **{k: v for k, v in iv.items() if k != "method"},
            }
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    for marker, value in filled.items():
        scalar = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        text = text.replace(marker, f"{scalar}  # the method's default layers")
    return text


def parameter_reference(recipe) -> str:
    """Comment lines naming every parameter of the recipe's methods: what is allowed, the default
    and its help, read from each method's parameter dataclass, with the method's citation."""
    from ..methods import METHODS

    lines = []
    for name in dict.fromkeys(recipe.methods):
        cls = METHODS[name]
        lines.append(f"# {name}: {cls.citation}; rule and parameters: {cls.docs}")
        for pname, spec in cls.params.items():
            lines.append(f"#   {pname}: {spec.allowed()}; default {spec.default!r} -- {spec.doc}")
    return "\n".join(lines) + "\n"


def cmd_recipes_show(args) -> int:
    import attnsteer

    try:
        recipe = attnsteer.load_recipe(args.recipe)
    except attnsteer.AttnsteerError as exc:
        raise CLIError(f"recipes show {args.recipe!r}: {exc}") from None
    origin = "built-in" if args.recipe in attnsteer.builtin_names() else str(args.recipe)
    print(f"# recipe {recipe.name!r} ({origin})")
    print(f"# hash (sha256, as recorded with results): {recipe.hash}")
    print(resolved_yaml(recipe), end="")
    print(parameter_reference(recipe), end="")
    return EXIT_OK


def _layer_ranges(layers: list[int]) -> str:
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ",".join(parts)


def cmd_recipes_validate(args) -> int:
    import warnings

    import attnsteer

    from ..plan import check_image_keys

    try:
        recipe = attnsteer.load_recipe(args.recipe)
    except attnsteer.AttnsteerError as exc:
        print(f"INVALID: {args.recipe}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    methods = ", ".join(recipe.methods)
    print(f"valid: {args.recipe} (recipe {recipe.name!r}, {len(recipe.interventions)} intervention(s): {methods})")
    print(f"hash: {recipe.hash}")
    if not args.model:
        return EXIT_OK
    model_id, kwargs = models.resolve_model(args.model, args.model_args)
    _, model = models.load_checked(model_id, kwargs, sys.stderr)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", attnsteer.AttnsteerWarning)
        try:
            planned = attnsteer.plan(model, recipe)
        except attnsteer.AttnsteerError as exc:
            print(f"INVALID on --model {model_id!r}: {args.recipe}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        plans, arch = planned.layers, planned.arch
    try:
        check_image_keys(planned, recipe.name, model_id)
    except attnsteer.AttnsteerError as exc:
        print(
            f"CANNOT RUN on --model {model_id!r}: {args.recipe} is valid in itself, but it cannot run from the command "
            f"line on this model: {exc}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    for w in record:
        if issubclass(w.category, attnsteer.AttnsteerWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    print(
        f"resolves on {model_id} ({model.config.model_type}, {arch.num_layers} layers x {arch.num_heads} query heads, "
        f"{arch.num_kv_heads} kv heads):"
    )
    by_method: dict[str, list[tuple[int, int]]] = {}
    for layer, plan in sorted(plans.items()):
        for m in plan.methods:
            heads = arch.num_heads if m.heads is None else int(m.heads.sum())
            by_method.setdefault(m.name, []).append((layer, heads))
    if not by_method:
        print("  nothing to steer (every intervention was skipped)")
    for name, items in by_method.items():
        layers = [layer for layer, _ in items]
        heads = {h for _, h in items}
        head_text = (
            f"all {arch.num_heads} heads"
            if heads == {arch.num_heads}
            else "selected heads " + "/".join(f"L{layer}:{h}" for layer, h in items)
        )
        print(f"  {name}: layers {_layer_ranges(layers)} ({len(layers)} layers), {head_text}")
    return EXIT_OK


def cmd_recipes_pull(args) -> int:
    import shutil
    from pathlib import Path

    from .. import recipe as recipe_mod

    try:
        repo_id = recipe_mod._hub_repo_id(args.repo_id, "REPO_ID")
    except recipe_mod.RecipeError as exc:
        raise CLIError(f"recipes pull {args.repo_id!r}: {exc}") from None
    out = Path(args.out if args.out is not None else repo_id.split("/")[-1]).expanduser()
    file = out if out.suffix.lower() in (".yaml", ".yml") else out / recipe_mod.RECIPE_FILENAME
    if file.is_dir() or (out.exists() and not out.is_dir() and file != out):
        raise CLIError(
            f"recipes pull {args.repo_id!r}: --out {str(out)!r} is a file (or a folder named like a YAML file). "
            "Fix: pass a folder, or a path ending in .yaml"
        )
    check_writable(file, "--out", folder=False)  # before the download
    try:
        recipe, text = recipe_mod.load_hub_recipe(repo_id, revision=args.revision)
    except recipe_mod.RecipeError as exc:
        raise CLIError(f"recipes pull {args.repo_id!r}: {exc}") from None
    state = "written"
    if file.is_file():
        if file.read_text() == text:
            state = "already up to date"
        elif not args.force:
            raise CLIError(
                f"recipes pull {args.repo_id!r}: {str(file)!r} already holds a different recipe. Fix: pass --force "
                "to replace it, or another --out"
            )
        else:
            state = "replaced"
    # the files it carries (e.g. SEKA's projections) go beside it; a different local one is replaced
    # only with --force, and the check comes before anything is written
    carried_targets = [(carried, file.parent / carried.path) for carried in recipe.carried_files]
    to_copy = [(c, t) for c, t in carried_targets if not t.is_file() or recipe_mod.file_sha256(t) != c.sha256]
    stale = [t for _, t in to_copy if t.is_file()]
    if stale and not args.force:
        raise CLIError(
            f"recipes pull {args.repo_id!r}: {str(stale[0])!r} already holds a different file than the recipe carries. "
            "Fix: pass --force to replace it, or another --out"
        )
    if state != "already up to date":
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)  # the file as published (comments kept); it validated above
    for carried, target in to_copy:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(carried.resolved, target)
    for carried, target in carried_targets:
        print(f"carried file: {target} (sha256 {carried.sha256})")
    revision = f" (revision {args.revision})" if args.revision else ""
    print(f"pulled hf://{repo_id}{revision} -> {file} ({state})")
    print(f"recipe: {recipe.name!r} ({len(recipe.interventions)} intervention(s): {', '.join(recipe.methods)})")
    print(f"hash: {recipe.hash}")
    print(f"use it: --recipe {file.parent if file.name == recipe_mod.RECIPE_FILENAME else file}")
    return EXIT_OK


def cmd_recipes_push(args) -> int:
    import attnsteer

    from .. import recipe as recipe_mod

    try:
        recipe = attnsteer.load_recipe(args.recipe)
    except attnsteer.AttnsteerError as exc:
        hint = f" (check it with `attnsteer recipes validate {args.recipe}`)" if _exists(args.recipe) else ""
        raise CLIError(f"recipes push {args.recipe!r}: nothing was uploaded: {exc}{hint}") from None
    try:
        repo_id = recipe_mod._hub_repo_id(args.repo_id, "REPO_ID", allow_bare=True)
        pushed = recipe.push_to_hub(repo_id, private=True if args.private else None)
    except attnsteer.AttnsteerError as exc:
        raise CLIError(f"recipes push {args.recipe!r} {args.repo_id!r}: {exc}") from None
    print(f"pushed recipe {recipe.name!r} -> hf://{pushed.repo_id} ({recipe_mod.RECIPE_FILENAME})")
    print(f"hash: {pushed.hash}")
    if pushed.commit_url:
        print(f"commit: {pushed.commit_url}")
    print(f"load it: attnsteer recipes pull {pushed.repo_id}   or   --recipe hf://{pushed.repo_id}")
    return EXIT_OK


def _exists(value) -> bool:
    from pathlib import Path

    return Path(str(value)).expanduser().exists()
