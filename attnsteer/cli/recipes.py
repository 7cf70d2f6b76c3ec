"""``attnsteer recipes list | show | validate``."""

from __future__ import annotations

import sys

from .. import models
from ._common import EXIT_OK, EXIT_USAGE, CLIError, Parser, missing_subcommand, subparser


def add_recipes(sub) -> None:
    parser = subparser(
        sub,
        "recipes",
        "list, show and validate steering recipes",
        "attnsteer recipes list",
        description="List the built-in recipes, show one resolved, or validate a recipe file.",
    )
    parser.set_defaults(func=lambda args: missing_subcommand(parser))
    rsub = parser.add_subparsers(title="recipes commands", metavar="{list,show,validate}", parser_class=Parser)

    p = subparser(rsub, "list", "table of the built-in recipes", "attnsteer recipes list")
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
        description="Check a recipe's schema; with --model also resolve its layers and heads on that model.",
    )
    p.add_argument("recipe", metavar="PATH", help="YAML file (or built-in name, folder, hub repo)")
    p.add_argument("--model", default=None, help="also resolve layers/heads against this model (id, folder or smollm2)")
    p.add_argument("--model_args", default=None, help="key=value,... e.g. dtype=bfloat16,device=cpu")
    p.set_defaults(func=cmd_recipes_validate)


def cmd_recipes_list(args) -> int:
    import attnsteer

    from ..console import first_sentence, term_width

    rows = []
    for name in attnsteer.builtin_names():
        try:
            recipe = attnsteer.load_recipe(name)
            rows.append((name, ",".join(dict.fromkeys(recipe.methods)), first_sentence(recipe.description, 200)))
        except attnsteer.AttnsteerError as exc:
            rows.append((name, "?", f"INVALID: {exc}"))
    name_w = max([len("NAME")] + [len(r[0]) for r in rows])
    meth_w = max([len("METHODS")] + [len(r[1]) for r in rows])
    desc_w = max(20, term_width() - name_w - meth_w - 4) if sys.stdout.isatty() else 10**6
    print(f"{'NAME':<{name_w}}  {'METHODS':<{meth_w}}  DESCRIPTION")
    for name, methods, desc in rows:
        if len(desc) > desc_w:
            desc = desc[: desc_w - 3].rstrip() + "..."
        print(f"{name:<{name_w}}  {methods:<{meth_w}}  {desc}")
    print(f"\n{len(rows)} built-in recipes. Details: attnsteer recipes show NAME")
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
