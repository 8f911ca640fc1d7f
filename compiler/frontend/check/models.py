"""Model blocks: `model`, with its nested `moe` and `mla` blocks, and the consistency of their
shapes (heads and kv_heads, top_k and experts, dense layers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowc.compiler import units
from flowc.compiler.frontend import ast
from flowc.compiler.frontend.check.vocabulary import ARCHITECTURES, DTYPES, SCHEMAS
from flowc.compiler.spec import MAX_COUNT, MAX_KNOB, MLA, Model, MoE

if TYPE_CHECKING:  # core imports this module to dispatch to it: the checker is only an annotation here
    from flowc.compiler.frontend.check.core import Block, Checker


def build_model(c: Checker, decl: ast.Decl) -> Model | None:
    b = c.block(decl.body, "model", decl.name)
    r = lambda key, read, required=False: c.one_value(b, key, "model", read, required, "model")  # noqa: E731  (local shorthand)
    fields = {
        "architecture": r("architecture", lambda e: c.word(e, ARCHITECTURES, "architecture"), True),
        # counts of layers and heads stay far below MAX_COUNT, widths below MAX_KNOB: beyond, the
        # cost model and the search loop for hours (a fuzzed `layers 1e12` never finished)
        **{key: r(key, lambda e, key=key: c.count(e, key, maximum=MAX_COUNT), True) for key in ("layers", "heads")},
        **{key: r(key, lambda e, key=key: c.count(e, key, maximum=MAX_KNOB), True)
           for key in ("hidden", "ffn", "vocab")},
        "max_context": r("max_context", lambda e: c.count(e, "max_context", 1, units.TOKENS, MAX_KNOB), True),
    }
    optional = {
        "kv_heads": r("kv_heads", lambda e: c.count(e, "kv_heads", maximum=MAX_COUNT)),
        "head_dim": r("head_dim", lambda e: c.count(e, "head_dim", maximum=MAX_KNOB)),
        "weights": r("weights", lambda e: c.word(e, DTYPES, "dtype")),
        "kv": r("kv", lambda e: c.word(e, DTYPES, "dtype")),
        "tied_embeddings": r("tied_embeddings", c.boolean),
        "attention_bias": r("attention_bias", c.boolean),
        "mlp": r("mlp", lambda e: c.word(e, ("gated", "plain"), "MLP kind")),
        "sliding_window": r("sliding_window", lambda e: c.count(e, "sliding_window", 1, units.TOKENS)),
    }
    moe = _moe(c, b.one("moe"), fields.get("ffn"))
    mla = _mla(c, b.one("mla"))
    if None in fields.values() or moe is False or mla is False:
        return None
    fields.update({k: v for k, v in optional.items() if v is not None})
    fields.setdefault("kv_heads", fields["heads"])
    if "head_dim" not in fields:
        if mla:
            fields["head_dim"] = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        elif fields["hidden"] % fields["heads"]:
            c.error("F0310", f"model `{decl.name.text}` needs a `head_dim`", decl.name.span,
                    f"hidden {fields['hidden']} is not a multiple of heads {fields['heads']}",
                    f"add `head_dim {fields['hidden'] // fields['heads']}` or the model's own value")
            return None
        else:
            fields["head_dim"] = fields["hidden"] // fields["heads"]
    if not _model_consistent(c, decl, b, fields, moe):
        return None
    return Model(name=decl.name.text, moe=moe or None, mla=mla or None, doc=decl.doc,
                 location=c.location(decl), **fields)


def _model_consistent(c: Checker, decl: ast.Decl, b: Block, f: dict, moe: MoE | None) -> bool:
    if f["heads"] % f["kv_heads"]:
        c.error("F0406", f"heads ({f['heads']}) is not a multiple of kv_heads ({f['kv_heads']})",
                b.one("kv_heads").args[0].span, "inconsistent", "grouped-query attention shares each KV head "
                "among a whole number of query heads")
        return False
    if moe and moe.top_k > moe.experts:
        c.error("F0406", f"top_k ({moe.top_k}) is larger than the number of experts ({moe.experts})",
                b.one("moe").key.span, "inconsistent", "each token picks top_k of the experts")
        return False
    if moe and moe.dense_layers >= f["layers"]:
        c.error("F0406", f"dense_layers ({moe.dense_layers}) leaves no MoE layer of {f['layers']}",
                b.one("moe").key.span, "inconsistent", "dense_layers counts the leading dense layers only")
        return False
    return True


def _nested(c: Checker, stmt: ast.Statement, name: str) -> Block | None:
    """The body of `moe { ... }` or `mla { ... }`; None after reporting another shape."""
    if stmt.body is None or stmt.args:
        c.error("F0305", f"`{name}` takes a block", stmt.span, f"expected `{name} {{ ... }}`",
                f"write `{SCHEMAS['model'][name]}`")
        return None
    return c.block(stmt.body, name, stmt.key)


def _moe(c: Checker, stmt: ast.Statement | None, ffn: int | None):
    """The MoE settings, None without a `moe` block, False after an error."""
    if stmt is None:
        return None
    b = _nested(c, stmt, "moe")
    if b is None:
        return False
    r = lambda key, required=False, minimum=1: c.one_value(  # noqa: E731  (local shorthand)
        b, key, "moe", lambda e: c.count(e, key, minimum, maximum=MAX_KNOB if key == "expert_ffn" else MAX_COUNT),
        required, "moe")
    experts, top_k = r("experts", True), r("top_k", True)
    expert_ffn, shared, dense = r("expert_ffn"), r("shared_experts", minimum=0), r("dense_layers", minimum=0)
    if experts is None or top_k is None or (expert_ffn or ffn) is None:
        return False
    return MoE(experts=experts, top_k=top_k, expert_ffn=expert_ffn or ffn, shared_experts=shared or 0,
               dense_layers=dense or 0)


def _mla(c: Checker, stmt: ast.Statement | None):
    """The MLA settings, None without an `mla` block, False after an error."""
    if stmt is None:
        return None
    b = _nested(c, stmt, "mla")
    if b is None:
        return False
    values = {key: c.one_value(b, key, "mla", lambda e, key=key: c.count(e, key), key != "q_lora_rank", "mla")
              for key in SCHEMAS["mla"]}
    if any(v is None for k, v in values.items() if k != "q_lora_rank"):
        return False
    return MLA(**values)
