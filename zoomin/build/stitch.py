"""Export a model one piece (layer, block) at a time and stitch the piece graphs into the one graph the runtime loads.

Each piece is a small torch module exported on its own with torch.onnx.export (dynamo, the same settings the
whole-model export used), so exporting needs only that piece's weights in memory. A `Piece` names how its graph
inputs and outputs connect: values are looked up by name in a running namespace, and a piece's outputs enter it
under their names, replacing what was there (`hidden` is the residual stream each layer reads and writes anew).
The same namespace drives both the stitched graph and the streamed calibration pass (zoomin.build.streaming),
which runs the pieces in order on real inputs.

Weights never pass through memory together: piece graphs keep their weights in external data files, onnx_ir loads
those lazily (memory-mapped) and `ir.save` copies them tensor by tensor into the stitched graph's data file.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common


@dataclass(frozen=True)
class Piece:
    name: str  # unique; prefixes the piece's internal names in the stitched graph ("layers.3")
    path: Path  # the piece graph, weights in `path`.data
    inputs: Mapping[str, str]  # piece graph input -> namespace value it reads
    outputs: Mapping[str, str]  # piece graph output -> namespace value it writes

    def with_path(self, path: Path) -> "Piece":
        """The same piece with another graph of the same interface (e.g. its quantized form)."""
        return Piece(self.name, Path(path), self.inputs, self.outputs)

    def data_files(self) -> list[Path]:
        return [p for p in self.path.parent.glob(self.path.name + "*") if p.is_file()]


class PieceExporter:
    """torch.onnx.export (dynamo, optimized, weights external) of pieces, tracing each structure only once.

    torch.export traces with fake tensors, so a piece's graph depends on its module's code, config and the
    shapes and dtypes of its parameters and example inputs, never on weight values; parameters enter the traced
    graph as initializers named by their module path. So the unoptimized graph traced for the first piece of a
    structure (`key`: all decoder layers share one, vision blocks one per attention kind and dtype) serves every
    piece of that structure with its own parameters bound by name; the optimizer (constant folding turns the
    weight transposes into new constants) then runs per piece, exactly as torch.onnx.export(optimize=True) does.
    Tracing is most of an export's time (~2 s a piece on 2 cores, at any width).
    """

    def __init__(self) -> None:
        self._traced: dict[object, ir.Model] = {}

    def export(self, key, module, args: tuple, path: Path, *, input_names: Sequence[str],
               output_names: Sequence[str], dynamic_shapes, opset: int, dim_names: Mapping[tuple[str, int], str] = {},
               finalize: Callable[[ir.Model], None] | None = None, **export_kwargs) -> Path:
        """Export `module` to `path` (+ `path`.data).

        dim_names: {(graph input or output, axis): name} for the symbolic dims torch.export names itself (s53, u0),
        so that every piece calls one dimension by the same name. finalize: a last rewrite before saving.
        """
        import torch

        from .export_decoder import quiet_export

        key = (key, opset, tuple(input_names), tuple(output_names))
        if key not in self._traced:
            with quiet_export():
                program = torch.onnx.export(module, args, dynamic_shapes=dynamic_shapes, opset_version=opset,
                                            dynamo=True, external_data=True, optimize=False, verbose=False,
                                            **export_kwargs)
            self._traced[key] = _forget_weights(program.model, module)
        model = self._traced[key].clone()
        _bind(model, module, path)
        program = torch.onnx.ONNXProgram(model, None)
        program.optimize()
        model = program.model
        # named after optimizing, as torch.onnx.export does (an output that is an input keeps its Identity)
        for value, name in [*zip(model.graph.inputs, input_names), *zip(model.graph.outputs, output_names)]:
            value.name = name
        io = {v.name: v for v in [*model.graph.inputs, *model.graph.outputs]}
        rename_dims(model, {io[value].shape[axis]: name for (value, axis), name in dim_names.items()})
        if finalize is not None:
            finalize(model)
            ir.passes.common.RemoveUnusedNodesPass()(model)  # e.g. the axes constants opset 17 takes as attributes
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        program.save(str(path), external_data=True)
        del program, model
        gc.collect()  # exported programs and IR graphs are reference cycles holding the piece's weights
        return path


def _forget_weights(model: ir.Model, module) -> ir.Model:
    """The traced graph without the tensors of `module` (each piece binds its own): a cached template must not keep
    the first piece's weights alive (the lm_head is 1.2 GB in float32 at 3B)."""
    inits = model.graph.initializers
    for name in [*dict(module.named_parameters()), *dict(module.named_buffers())]:
        if name in inits:
            inits[name].const_value = None
    return model


def _bind(model: ir.Model, module, where: Path) -> None:
    """Give the traced graph `module`'s own parameters and buffers (matched by name, shape and dtype)."""
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    inits = model.graph.initializers
    for name, tensor in tensors.items():
        if name not in inits:
            continue  # a buffer the graph does not use
        value = inits[name]
        new = ir.Tensor(tensor.detach().numpy(), name=name)  # a view: no copy (graph dtypes are numpy's)
        if tuple(new.shape) != tuple(value.shape) or new.dtype != value.dtype:
            raise ValueError(f"{where}: {name} is {new.dtype} {tuple(new.shape)}, the traced piece has "
                             f"{value.dtype} {tuple(value.shape)}: pieces of one key must share their structure")
        value.const_value = new
    missing = [n for n, p in module.named_parameters() if n not in inits]
    if missing:
        raise ValueError(f"{where}: parameters {missing} are not initializers of the traced graph")


def rename_dims(model: ir.Model, names: Mapping) -> None:
    """Give symbolic dims stable names everywhere they occur in the graph."""
    old = {str(k): v for k, v in names.items()}
    if not old:
        return
    values = [*model.graph.inputs, *model.graph.outputs]
    values += [out for node in model.graph for out in node.outputs]
    for value in values:
        if value.shape is not None and any(str(d) in old for d in value.shape):
            value.shape = ir.Shape([old.get(str(d), d) if isinstance(d, ir.SymbolicDim) else d for d in value.shape])


class StitchError(ValueError):
    """Pieces that do not connect (a value no piece produced, opset versions that disagree)."""


def stitch(pieces: Sequence[Piece], out_path: Path, *, inputs: Sequence[str], outputs: Sequence[str],
           name: str = "main_graph", output_names: Sequence[str] | None = None) -> Path:
    """One graph from `pieces`, run in order: graph inputs `inputs`, outputs `outputs` (namespace names, in order),
    named `output_names` if given (an output cannot share a name with an input: a stage reads and writes `hidden`).

    A piece input whose namespace value is not produced yet becomes a graph input (and must be in `inputs`).
    Internal values and initializers are prefixed with the piece name; symbolic dims that a piece's interface does
    not share with the namespace keep their names prefixed too, so that two pieces' unrelated s53 never meet.
    """
    out_path = Path(out_path)
    graph = ir.Graph([], [], nodes=[], name=name)
    model = ir.Model(graph, ir_version=8)
    space: dict[str, ir.Value] = {}
    declared = set(inputs)
    opsets: dict[str, int] = {}
    for piece in pieces:
        part = ir.load(str(piece.path))
        model.ir_version = max(model.ir_version, part.ir_version)
        for domain, version in part.opset_imports.items():
            if opsets.setdefault(domain, version) != version:
                raise StitchError(f"{piece.path}: opset {domain or 'ai.onnx'} {version}, other pieces use "
                                  f"{opsets[domain]}")
        g = part.graph
        out_names = [v.name for v in g.outputs]
        if set(piece.inputs) != {v.name for v in g.inputs} or set(piece.outputs) != {v.name for v in g.outputs}:
            raise StitchError(f"{piece.path}: graph I/O {[v.name for v in g.inputs]} -> {[v.name for v in g.outputs]} "
                              f"does not match piece {piece.name}'s {list(piece.inputs)} -> {list(piece.outputs)}")
        # Interface symbolic dims keep their names (they are the namespace's); the rest get the piece prefix.
        shared = {str(d) for v in [*g.inputs, *g.outputs] if v.shape is not None for d in v.shape
                  if isinstance(d, ir.SymbolicDim)}
        local = {}
        for v in _all_values(g):
            v.name = f"{piece.name}.{v.name}"
            if v.shape is not None:
                local.update({str(d): f"{piece.name}.{d}" for d in v.shape
                              if isinstance(d, ir.SymbolicDim) and d.value is not None and str(d) not in shared})
        for node in g:
            node.name = f"{piece.name}.{node.name}"
        for old_input in list(g.inputs):
            target = piece.inputs[old_input.name]
            if target not in space:
                if target not in declared:
                    raise StitchError(f"piece {piece.name} reads {target!r}, which no earlier piece produced and "
                                      f"is not a graph input")
                space[target] = ir.Value(name=target, shape=old_input.shape, type=old_input.type)
                graph.inputs.append(space[target])
            ir.convenience.replace_all_uses_with(old_input, space[target], replace_graph_outputs=True)
        for init in list(g.initializers.values()):
            del g.initializers[init.name]
            graph.register_initializer(init)
        nodes = list(g)
        g.remove(nodes)
        graph.extend(nodes)
        results = list(g.outputs)
        g.outputs.clear()
        space.update({piece.outputs[n]: v for n, v in zip(out_names, results)})
        _prefix_dims([v for n in nodes for v in n.outputs], local)
    missing = [n for n in outputs if n not in space]
    unused = [n for n in inputs if n not in space]
    if missing or unused:
        raise StitchError(f"no piece produces {missing}" if missing else f"no piece reads graph inputs {unused}")
    order = list(inputs)
    graph.inputs.sort(key=lambda v: order.index(v.name))
    for out_name, graph_name in zip(outputs, output_names or outputs, strict=True):
        value = space[out_name]
        if value in graph.inputs:
            raise StitchError(f"output {out_name!r} is the graph input itself: no piece writes it")
        value.name = graph_name
        graph.outputs.append(value)
    model.opset_imports.update(opsets)
    graph.opset_imports.update(opsets)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data = out_path.with_name(out_path.name + ".data")
    data.unlink(missing_ok=True)
    ir.save(model, str(out_path), external_data=data.name)
    return out_path


def _all_values(g: ir.Graph) -> list[ir.Value]:
    """Initializers and node outputs (graph inputs are replaced, not renamed)."""
    return [*g.initializers.values(), *(v for n in g for v in n.outputs)]


def _prefix_dims(values: Sequence[ir.Value], local: Mapping[str, str]) -> None:
    for value in values:
        if value.shape is not None and any(str(d) in local for d in value.shape):
            value.shape = ir.Shape([local.get(str(d), d) if isinstance(d, ir.SymbolicDim) else d for d in value.shape])
