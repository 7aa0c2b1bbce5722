"""``onnxcompress inspect`` and ``onnxcompress recipes``: what a model holds, what a shipped recipe does (CLI only).

inspect prints: opset, inputs/outputs, nodes, parameters (float and integer), bytes raw and zipped, MACs at the
bound input shapes (shape inference, else one onnxruntime run on all-zero inputs), the op histogram, the largest weight tensors, per-tensor sparsity (zeros / elements, storage,
N:M pattern when the non-zeros form one), the channel groups prune-channels can cut (or why not), and the units
prune-layers can remove (residual blocks, transformer layers, stages, no-op layers; or why a candidate is not
removable). ``--json`` prints all of it as one JSON document.
"""

from __future__ import annotations

import argparse
import json

from onnxcompress import io


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Left-aligned columns, a dashed rule under the header."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)))


def _weights(model) -> list[tuple[str, str, list[int], int]]:
    import numpy as np
    import onnx

    weights = []
    for g in io.iter_graphs(model.graph):
        for t in g.initializer:
            n = int(np.prod(list(t.dims), dtype=np.int64)) if len(t.dims) else 1
            weights.append((t.name, onnx.TensorProto.DataType.Name(t.data_type), list(t.dims), n))
        for node in g.node:
            if node.op_type == "Constant":
                arr = io.constant_node_value(node)
                if arr is not None:
                    weights.append((node.output[0], str(arr.dtype), list(arr.shape), int(arr.size)))
    return sorted(weights, key=lambda w: -w[3])


def _removable_units(model, shapes) -> list[dict] | str:
    """prune-layers' units, or the one-line reason the analysis could not run on this model."""
    from onnxcompress.analyses.blocks import describe_units
    from onnxcompress.errors import OnnxCompressError

    try:
        return describe_units(model, shapes)
    except OnnxCompressError as exc:
        return str(exc)


def cmd_inspect(args: argparse.Namespace, dims: dict[str, int], shapes_arg: dict[str, tuple[int, ...]]) -> int:
    """``onnxcompress inspect``: see the module docstring."""
    import numpy as np

    from onnxcompress.analyses import sparsity
    from onnxcompress.analyses.channel_groups import describe_groups
    from onnxcompress.analyses.model_stats import model_stats
    from onnxcompress.data import bind_dims, check_dim_names, model_inputs
    from onnxcompress.report import human_bytes, human_count

    model = io.read_model(args.input)
    inputs = model_inputs(model, tensors_only=True)
    check_dim_names(inputs, dims)
    shapes = bind_dims(inputs, dims, shapes_arg)
    # where shape inference stops (attention masks, computed Reshape targets), MACs come from one ORT run on zeros
    # at those shapes: index 0 is in every table, so token-id inputs run too
    zeros = {s.name: np.zeros(shapes[s.name], s.dtype) for s in inputs if s.name in shapes}
    st = model_stats(model, shapes, zeros if len(zeros) == len(inputs) else None)
    weights = _weights(model)
    sparse = [e for e in sparsity.sparsity_table(model, min_elements=16)]
    groups = describe_groups(model)
    units = _removable_units(model, shapes)
    info = {
        "file": str(args.input),
        "opset": st.opset,
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [{"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape)} for s in inputs],
        "outputs": [o.name for o in model.graph.output],
        "input_shapes_for_macs": {k: list(v) for k, v in shapes.items()},
        "stats": st.to_dict(),
        "weights": [{"name": n, "dtype": d, "shape": s, "elements": e} for n, d, s, e in weights],
        "sparsity": {"summary": sparsity.summary(sparse), "tensors": [e.to_dict() for e in sparse]},
        "channel_groups": groups,
        "removable_units": units,
    }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{args.input}: opset {st.opset}, IR {model.ir_version}, producer '{info['producer']}'")
    for s in inputs:
        print(f"  input  {s.name}: {s.dtype} {['?' if d is None else d for d in s.shape]}")
    for o in info["outputs"]:
        print(f"  output {o}")
    print(f"nodes {st.nodes}, params {human_count(st.params)}" + (f" ({human_count(st.int_params)} integer)"
                                                                   if st.int_params else "")
          + f", bytes {human_bytes(st.bytes_raw)} (zipped {human_bytes(st.bytes_zip)}), MACs "
          f"{human_count(st.macs)} at {info['input_shapes_for_macs']}"
          + (f" ({st.macs_unknown} nodes with unknown shapes not counted)" if st.macs_unknown else ""))
    print("ops: " + ", ".join(f"{k} {v}" for k, v in st.ops.items()))
    print(f"largest weight tensors ({len(weights)} in all):")
    print_table(["name", "dtype", "shape", "elements"],
                [[n[:60], d, str(s), human_count(e)] for n, d, s, e in weights[: args.top]])
    total = info["sparsity"]["summary"]
    print(f"sparsity: {total['zeros']} of {total['elements']} weight elements are zero ({total['sparsity']:.1%})")
    sparse_rows = [e for e in sparse if e.zeros]
    if sparse_rows:
        print_table(["tensor", "shape", "sparsity", "storage", "N:M"],
                    [[e.name[:60], str(list(e.shape)), f"{e.sparsity:.1%}", e.storage, e.nm or "-"]
                     for e in sparse_rows[: args.top]])
    print(f"channel groups: {len(groups)}")
    print_table(["group", "channels", "members", "prunable"],
                [[str(g["id"]), str(g["size"]), str(len(g["members"])),
                  "yes" if g["prunable"] else f"no: {g['reason']}"] for g in groups[: args.top]])
    if isinstance(units, str):
        print(f"removable units (prune-layers): not analysed: {units}")
    else:
        found = [u for u in units if u.get("removable")]
        rejected = [u for u in units if not u.get("removable")]
        print(f"removable units (prune-layers): {len(found)}" + (f"; {len(rejected)} candidates not removable"
                                                                 if rejected else ""))
        if found:
            print_table(["unit", "kind", "entry -> exit", "nodes", "params"],
                        [[str(u.get("id")), f"{u.get('kind')}/{u.get('role')}", f"{u.get('entry')} -> {u.get('exit')}"[:70],
                          str(_count(u.get("nodes"))), human_count(int(u.get("params") or 0))]
                         for u in found[: args.top]])
        for u in rejected[: args.top]:
            print(f"  not removable: {u.get('kind')} at {u.get('where')}: {u.get('reason')}")
    return 0


def _count(nodes) -> int:
    return len(nodes) if isinstance(nodes, (list, tuple)) else int(nodes or 0)


def cmd_recipes(args: argparse.Namespace) -> int:
    """``onnxcompress recipes``: the shipped recipes, their descriptions and pipelines."""
    from onnxcompress.pipeline import format_pipeline, load_recipe
    from onnxcompress.recipes import list_recipes, recipe_path

    recipes = list_recipes()
    if args.json:
        print(json.dumps({name: {"description": d, "pipeline": format_pipeline(load_recipe(name)),
                                 "file": str(recipe_path(name))} for name, d in recipes.items()}, indent=2))
        return 0
    for name, description in recipes.items():
        print(f"{name}: {description}")
        print(f"    {format_pipeline(load_recipe(name))}")
    print("use: onnxcompress compress IN.onnx -o OUT.onnx --recipe NAME --calib DATA")
    return 0
