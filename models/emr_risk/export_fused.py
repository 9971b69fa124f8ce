"""The emr_risk model as one fused ONNX graph of ONNX Runtime contrib ops (com.microsoft).

    python -m models.emr_risk.export_fused [--state models/emr_risk/emr_risk.pt] [--dtype fp16]

The dynamo export (:mod:`models.emr_risk.export`) is a faithful but unfused
graph: attention is MatMul/Softmax/Transpose/Reshape chains that ONNX
Runtime's transformer optimizer does not recognise, so the CUDA EP runs it as
dozens of small kernels. This builder writes the same computation, from the
same trained weights, with the fused kernels ONNX Runtime ships:

* ``MultiHeadAttention`` (flash / memory-efficient attention on the CUDA EP),
  Q, K and V packed per head into one projection;
* ``SkipLayerNormalization`` (residual add + bias + LayerNorm in one kernel);
* ``BiasGelu`` (bias + exact erf GELU);
* the last layer computes attention and the feed-forward block for the
  patient (CLS) position only — the heads read nothing else.

``dtype="fp16"`` stores weights and activations in fp16 from the embeddings
on; the time features, the final logits and the sigmoid stay fp32, and the
graph's inputs and outputs keep the model card's types, so every runner feeds
it exactly as it feeds the reference export. Every build is compared with the
reference ONNX before it is written (see :func:`check_against_reference`).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"
OPSET = 18
_DT = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}


class _Graph:
    """A tiny graph writer: named initializers and nodes with generated output names."""

    def __init__(self, np_dtype: type, onnx_dtype: int):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.np_dtype = np_dtype
        self.onnx_dtype = onnx_dtype
        self._n = 0

    def init(self, name: str, value: np.ndarray, keep_type: bool = False) -> str:
        arr = np.asarray(value)
        if not keep_type and arr.dtype.kind == "f":
            arr = arr.astype(self.np_dtype)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "",
           unused: tuple[int, ...] = (), **attrs) -> list[str]:
        self._n += 1
        outs = ["" if i in unused else f"{op_type.lower()}_{self._n}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{op_type}_{self._n}",
                                           domain=domain, **attrs))
        return outs

    def one(self, op_type: str, inputs: list[str], domain: str = "", **attrs) -> str:
        return self.op(op_type, inputs, 1, domain, **attrs)[0]


def build(state: dict[str, np.ndarray], n_heads: int, max_days: float, dtype: str = "fp32",
          packed_qkv: bool = False, eps: float = 1e-5) -> onnx.ModelProto:
    """The fused graph for an :class:`models.emr_risk.model.EmrRiskModel` state dict (numpy arrays).

    ``packed_qkv`` feeds attention one [B, L, heads, 3, head_dim] tensor (CUDA EP only);
    otherwise one projection is split into Q, K and V and the bias is fused into attention
    (every EP, the CPU included).
    """
    np_dtype, onnx_dtype = _DT[dtype]
    g = _Graph(np_dtype, onnx_dtype)
    d = state["cls"].shape[0]
    head_dim = d // n_heads
    n_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))

    def cast(x: str, to: int) -> str:
        return x if to == TensorProto.FLOAT and dtype == "fp32" else g.one("Cast", [x], to=to)

    # Time features in fp32 (log/sin/cos), projected in the working dtype.
    f32 = lambda name, v: g.init(name, np.asarray(v, np.float32), keep_type=True)  # noqa: E731
    days = g.one("Max", ["days_before", f32("zero_f", 0.0)])
    x = g.one("Mul", [g.one("Log", [g.one("Add", [days, f32("one_f", 1.0)])]),
                      f32("inv_log_max_days", 1.0 / math.log1p(max_days))])
    px = g.one("Mul", [x, f32("pi_f", math.pi)])
    feats = [x, g.one("Mul", [x, x]), g.one("Sin", [px]), g.one("Cos", [px])]
    axes_last = g.init("axes_last", np.array([-1], np.int64))
    feats = g.one("Concat", [g.one("Unsqueeze", [f, axes_last]) for f in feats], axis=-1)
    time = g.one("MatMul", [cast(feats, onnx_dtype), g.init("time_proj_wT", state["time_proj.weight"].T)])
    time = g.one("Add", [time, g.init("time_proj_b", state["time_proj.bias"])])
    emb = g.one("Gather", [g.init("token_emb", state["token_emb.weight"]), "tokens"], axis=0)
    h = g.one("Add", [emb, time])  # [B, S, d]

    age = g.one("Unsqueeze", [g.one("Div", ["age_years", f32("hundred_f", 100.0)]), axes_last])
    age = g.one("Concat", [age, g.one("Mul", [age, age])], axis=-1)  # [B, 2] fp32
    patient = g.one("Add", [g.one("MatMul", [cast(age, onnx_dtype), g.init("age_proj_wT", state["age_proj.weight"].T)]),
                            g.init("age_proj_b", state["age_proj.bias"])])
    patient = g.one("Add", [patient, g.one("Gather", [g.init("sex_emb", state["sex_emb.weight"]), "sex"], axis=0)])
    patient = g.one("Add", [patient, g.init("cls", state["cls"])])
    axes_1 = g.init("axes_1", np.array([1], np.int64))
    hidden = g.one("Concat", [g.one("Unsqueeze", [patient, axes_1]), h], axis=1)  # [B, L=S+1, d]

    # Key padding mask, 1 = attend: the patient position always, tokens where != 0.
    valid = g.one("Cast", [g.one("Not", [g.one("Equal", ["tokens", g.init("zero_i64", np.array(0, np.int64))])])],
                  to=TensorProto.INT32)
    ones = g.one("ConstantOfShape", [g.one("Concat", [g.one("Shape", ["sex"]), g.init("one_i64", np.array([1], np.int64))],
                                           axis=0)],
                 value=numpy_helper.from_array(np.array([1], np.int32)))
    mask = g.one("Concat", [ones, valid], axis=1)  # [B, L] int32

    def packed_weights(layer: int) -> tuple[np.ndarray, np.ndarray]:
        # in_proj rows are [q; k; v], each [heads * head_dim]; MultiHeadAttention's packed
        # QKV layout is [B, L, heads, 3, head_dim]: reorder the output columns to match.
        w = state[f"encoder.layers.{layer}.self_attn.in_proj_weight"]  # [3d, d]
        b = state[f"encoder.layers.{layer}.self_attn.in_proj_bias"]
        order = np.array([p * d + n * head_dim + k for n in range(n_heads) for p in range(3)
                          for k in range(head_dim)])
        return w[order].T, b[order]

    def ln_params(prefix: str) -> tuple[str, str]:
        return g.init(f"{prefix}_g", state[f"{prefix}.weight"]), g.init(f"{prefix}_b", state[f"{prefix}.bias"])

    def ffn(layer: int, x_ln: str) -> str:
        pre = f"encoder.layers.{layer}"
        up = g.one("MatMul", [x_ln, g.init(f"l{layer}_w1T", state[f"{pre}.linear1.weight"].T)])
        act = g.one("BiasGelu", [up, g.init(f"l{layer}_b1", state[f"{pre}.linear1.bias"])], domain=MS)
        return g.one("MatMul", [act, g.init(f"l{layer}_w2T", state[f"{pre}.linear2.weight"].T)])

    g1, b1 = ln_params("encoder.layers.0.norm1")
    x_ln = g.one("LayerNormalization", [hidden, g1, b1], axis=-1, epsilon=eps)
    resid = hidden
    reshape_packed = g.init("shape_packed", np.array([0, 0, n_heads, 3, head_dim], np.int64))
    for layer in range(n_layers):
        pre = f"encoder.layers.{layer}"
        last = layer == n_layers - 1
        w, b = packed_weights(layer)
        if not last and packed_qkv:
            qkv = g.one("Add", [g.one("MatMul", [x_ln, g.init(f"l{layer}_wqkvT", w)]), g.init(f"l{layer}_bqkv", b)])
            qkv = g.one("Reshape", [qkv, reshape_packed])
            attn = g.one("MultiHeadAttention", [qkv, "", "", "", mask], domain=MS, num_heads=n_heads)
        elif not last:
            w_in = state[f"{pre}.self_attn.in_proj_weight"]
            qkv = g.one("MatMul", [x_ln, g.init(f"l{layer}_wqkvT", w_in.T)])
            q, k, v = g.op("Split", [qkv, g.init(f"l{layer}_split", np.array([d, d, d], np.int64))], n_out=3,
                           axis=-1)
            bias = g.init(f"l{layer}_bqkv_flat", state[f"{pre}.self_attn.in_proj_bias"])
            attn = g.one("MultiHeadAttention", [q, k, v, bias, mask], domain=MS, num_heads=n_heads)
        else:
            # Only the patient position feeds the heads: one query, all keys and values.
            wq, wk, wv = np.split(state[f"{pre}.self_attn.in_proj_weight"], 3)
            bq, bk, bv = np.split(state[f"{pre}.self_attn.in_proj_bias"], 3)
            first = g.one("Slice", [x_ln, g.init("zero_1", np.array([0], np.int64)),
                                    g.init("one_1", np.array([1], np.int64)), axes_1])
            q = g.one("MatMul", [first, g.init(f"l{layer}_wqT", wq.T)])
            k = g.one("MatMul", [x_ln, g.init(f"l{layer}_wkT", wk.T)])
            v = g.one("MatMul", [x_ln, g.init(f"l{layer}_wvT", wv.T)])
            bias = g.init(f"l{layer}_bqkv_flat", np.concatenate([bq, bk, bv]))
            attn = g.one("MultiHeadAttention", [q, k, v, bias, mask], domain=MS, num_heads=n_heads)
            resid = g.one("Slice", [resid, "zero_1", "one_1", axes_1])
        out = g.one("MatMul", [attn, g.init(f"l{layer}_woT", state[f"{pre}.self_attn.out_proj.weight"].T)])
        g2, b2 = ln_params(f"{pre}.norm2")
        x_ln, _, _, resid = g.op("SkipLayerNormalization",
                                 [out, resid, g2, b2, g.init(f"l{layer}_bo", state[f"{pre}.self_attn.out_proj.bias"])],
                                 n_out=4, unused=(1, 2), domain=MS, epsilon=eps)
        f = ffn(layer, x_ln)
        gn, bn = ln_params(f"encoder.layers.{layer + 1}.norm1") if not last else ln_params("norm")
        x_ln, _, _, resid = g.op("SkipLayerNormalization",
                                 [f, resid, gn, bn, g.init(f"l{layer}_b2", state[f"{pre}.linear2.bias"])],
                                 n_out=4, unused=(1, 2), domain=MS, epsilon=eps)
    cls_out = g.one("Squeeze", [x_ln, axes_1])  # [B, d] (the last layer kept only position 0)
    logits = g.one("MatMul", [cast(cls_out, TensorProto.FLOAT), g.init("heads_wT", state["heads.weight"].T.astype(np.float32), keep_type=True)])
    logits = g.one("Add", [logits, g.init("heads_b", state["heads.bias"].astype(np.float32), keep_type=True)])
    g.nodes.append(helper.make_node("Sigmoid", [logits], ["probs"], name="Sigmoid_out"))

    inputs = [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("days_before", TensorProto.FLOAT, ["batch", "seq"]),
              helper.make_tensor_value_info("age_years", TensorProto.FLOAT, ["batch"]),
              helper.make_tensor_value_info("sex", TensorProto.INT64, ["batch"])]
    outputs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])]
    graph = helper.make_graph(g.nodes, f"emr_risk_fused_{dtype}", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="medscreen.models.emr_risk.export_fused")
    model.ir_version = 9
    return model


def check_against_reference(fused: Path, reference: Path, vocab_size: int, rows: int = 64, seq: int = 40,
                            seed: int = 0) -> float:
    """max |Δp| of ``fused`` against the reference export on random timelines (ORT, CPU)."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, seq + 1, rows)
    tokens = rng.integers(3, vocab_size, (rows, seq))
    tokens[np.arange(seq)[None, :] >= lengths[:, None]] = 0
    feed = {"tokens": tokens.astype(np.int64), "days_before": rng.uniform(0, 2000, (rows, seq)).astype(np.float32),
            "age_years": rng.uniform(18, 90, rows).astype(np.float32), "sex": rng.integers(0, 3, rows).astype(np.int64)}
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ref = ort.InferenceSession(str(reference), opts, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(str(fused), opts, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    return float(np.max(np.abs(ref - got)))


# Largest max |Δp| against the reference export a fused graph may show when exported
# (fp32: rounding only; fp16: the fp16 gate's own limit). Engines gate it again on real data.
EXPORT_MAX_ABS_DELTA = {"fp32": 1e-4, "fp16": 0.02}


def export_and_record(card_path: Path, repo_root: Path) -> dict[str, Path]:
    """Build the fused fp32 and fp16 graphs from the card's torch weights, check, write, record them.

    The card gains ``fused_onnx.graphs.<precision>`` (path, sha256, bytes, max |Δp|
    against the reference export on random timelines, ORT CPU EP); engines build their
    ONNX Runtime plans of that precision from it. Raises ValueError when a fused graph
    disagrees with the reference export beyond :data:`EXPORT_MAX_ABS_DELTA`.
    """
    import torch
    import yaml

    from lake.files import file_sha256

    repo_root = Path(repo_root).resolve()
    text = Path(card_path).read_text()
    card = yaml.safe_load(text)
    arch = card["architecture"]
    reference = repo_root / card["onnx"]["path"]
    state_file = repo_root / card["torch"]["state_dict"]
    state = {k: v.detach().cpu().numpy() for k, v in torch.load(state_file, map_location="cpu").items()}
    graphs: dict[str, dict] = {}
    written: dict[str, Path] = {}
    ops: set[str] = set()
    for precision in ("fp32", "fp16"):
        out = reference.with_name(f"{reference.stem}.fused-{precision}.onnx")
        model = build(state, int(arch["n_heads"]), float(arch["max_days"]), precision)
        onnx.checker.check_model(model, full_check=True)
        ops |= {n.op_type for n in model.graph.node if n.domain == MS}
        tmp = out.with_name(out.name + ".tmp")
        onnx.save(model, tmp)
        delta = check_against_reference(tmp, reference, int(arch["vocab_size"]))
        if delta > EXPORT_MAX_ABS_DELTA[precision]:
            tmp.unlink()
            raise ValueError(f"fused {precision} graph disagrees with the reference export {reference.name}: "
                             f"max |dp| {delta:.2e} > {EXPORT_MAX_ABS_DELTA[precision]:.0e}")
        tmp.replace(out)
        resolved = out.resolve()
        graphs[precision] = {
            "path": str(resolved.relative_to(repo_root)) if resolved.is_relative_to(repo_root) else str(resolved),
            "sha256": file_sha256(out), "bytes": out.stat().st_size,
            "max_abs_delta_p_vs_reference": float(f"{delta:.3g}")}
        written[precision] = out
    card["fused_onnx"] = {"built_from": "the torch state_dict the card names (models.emr_risk.export_fused)",
                          "contrib_ops": sorted(ops), "graphs": graphs}
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    tmp_card = Path(card_path).with_name(Path(card_path).name + ".tmp")
    tmp_card.write_text(header + yaml.safe_dump(card, sort_keys=False))
    tmp_card.replace(card_path)
    return written


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(prog="python -m models.emr_risk.export_fused", description=__doc__.splitlines()[0])
    p.add_argument("--card", type=Path, default=here.parents[1] / "conf" / "models" / "emr_risk.yaml")
    args = p.parse_args(argv)
    for precision, out in export_and_record(args.card, here.parents[1]).items():
        print(precision, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
