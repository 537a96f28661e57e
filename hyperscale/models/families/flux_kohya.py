"""kohya / ComfyUI LoRA keys for FLUX: diffusers module names -> Black Forest Labs' (BFL) names.

kohya's sd-scripts and ComfyUI name FLUX LoRA layers after BFL's original modules
(``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``, ...), and
diffusers reads such files (``FluxLoraLoaderMixin.lora_state_dict`` ->
``_convert_kohya_flux_lora_to_diffusers``). The generic ``lora_unet_<diffusers path>`` keys of
``lora.kohya_state_dict`` are rejected there ("Incompatible keys"), hence this writer.

BFL fuses layers diffusers keeps apart: a double block's image q/k/v (``img_attn_qkv``) and
text q/k/v (``txt_attn_qkv``), and a single block's q/k/v and MLP input (``linear1``). A LoRA on
the separate layers is written as one LoRA on the fused layer that gives the same update: lora_down
stacks the members' A (a zero block for a member without LoRA), lora_up is block diagonal in their
B, so the rank is m r for m members and alpha is m alpha (the scale alpha / r is kept). That is
the layout diffusers' reader splits back exactly (its "sparse" case). The final layer's alpha is
ignored by that reader, so its scale is folded into lora_up there (alpha = rank), and its adaLN
rows are written in BFL's (shift, scale) order.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

# diffusers path inside a block -> BFL name inside it; fused groups list their members in BFL's order
_DOUBLE = {"attn.to_out.0": "img_attn_proj", "attn.to_add_out": "txt_attn_proj", "ff.net.0.proj": "img_mlp_0",
           "ff.net.2": "img_mlp_2", "ff_context.net.0.proj": "txt_mlp_0", "ff_context.net.2": "txt_mlp_2",
           "norm1.linear": "img_mod_lin", "norm1_context.linear": "txt_mod_lin"}
_DOUBLE_FUSED = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation_lin"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_GLOBAL = {"x_embedder": "img_in", "context_embedder": "txt_in",
           "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in_out_layer"}
_FINAL = {"proj_out": "final_layer_linear", "norm_out.linear": "final_layer_adaLN_modulation_1"}
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def _swap_halves(w: Tensor) -> Tensor:
    """Rows (scale, shift) <-> (shift, scale): diffusers' and BFL's order of the final adaLN output."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _pairs(state: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """peft keys -> {module path: (lora_A, lora_B)}."""
    out: dict[str, list] = {}
    for k, v in state.items():
        for i, suffix in enumerate((".lora_A.weight", ".lora_B.weight")):
            if k.endswith(suffix):
                out.setdefault(k[: -len(suffix)], [None, None])[i] = v
                break
        else:
            raise ValueError(f"unexpected LoRA key {k!r}")
    return {m: (a, b) for m, (a, b) in out.items()}


def bfl_state_dict(net: nn.Module, state: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """The peft LoRA ``state`` on the FluxTransformer2DModel ``net`` under BFL kohya keys (module docstring)."""
    pairs = _pairs(state)
    out: dict[str, Tensor] = {}
    fused: dict[str, tuple[str, tuple[str, ...]]] = {}  # BFL name -> (block prefix, members)

    def put(name: str, down: Tensor, up: Tensor, a: float) -> None:
        out[f"lora_unet_{name}.lora_down.weight"] = down.contiguous()
        out[f"lora_unet_{name}.lora_up.weight"] = up.contiguous()
        out[f"lora_unet_{name}.alpha"] = torch.tensor(float(a))

    for path, (down, up) in pairs.items():
        m = _BLOCK.match(path)
        if m is None:
            if path in _GLOBAL:
                put(_GLOBAL[path], down, up, alpha)
            elif path in _FINAL:  # alpha ignored by the reader: the scale goes into lora_up
                up = up * (alpha / down.shape[0])
                put(_FINAL[path], down, _swap_halves(up) if path == "norm_out.linear" else up, down.shape[0])
            else:
                raise ValueError(f"LoRA on {path!r} has no BFL kohya name; leave it out of the LoRA targets or "
                                 f"save without kohya=True")
            continue
        kind, i, inside = m.groups()
        single = kind == "single_transformer_blocks"
        bfl = f"{'single' if single else 'double'}_blocks_{i}_"
        plain, groups = (_SINGLE, _SINGLE_FUSED) if single else (_DOUBLE, _DOUBLE_FUSED)
        group = next((g for g, members in groups.items() if inside in members), None)
        if inside in plain:
            put(bfl + plain[inside], down, up, alpha)
        elif group is not None:
            fused[bfl + group] = (f"{kind}.{i}.", groups[group])
        else:
            raise ValueError(f"LoRA on {path!r} has no BFL kohya name; leave it out of the LoRA targets or "
                             f"save without kohya=True")
    for name, (prefix, members) in fused.items():
        present = [pairs.get(prefix + mem) for mem in members]
        a0 = next(p for p in present if p is not None)[0]
        r = a0.shape[0]
        outs = [net.get_submodule(prefix + mem).out_features for mem in members]
        down = a0.new_zeros(len(members) * r, a0.shape[1])
        up = a0.new_zeros(sum(outs), len(members) * r)
        row = 0
        for j, (p, n_out) in enumerate(zip(present, outs)):
            if p is not None:
                down[j * r:(j + 1) * r] = p[0]
                up[row:row + n_out, j * r:(j + 1) * r] = p[1]
            row += n_out
        put(name, down, up, alpha * len(members))  # rank m r: alpha m alpha keeps the scale alpha / r
    return out
