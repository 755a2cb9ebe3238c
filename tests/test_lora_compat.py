"""The LoRA files videoblade writes, read by the tools researchers load them with.

* diffusers (installed): `WanPipeline` / `CogVideoXPipeline.load_lora_weights` on the diffusers file,
  `WanPipeline.load_lora_weights` on the original-Wan / ComfyUI export (diffusers' own converter,
  `_convert_non_diffusers_wan_lora_to_diffusers`), and videoblade's `load_lora_into` must all give the
  forward of the module the LoRA was trained in.
* ComfyUI (not installed): its key-mapping, loading and merge rules are re-implemented below from
  its source (see `_comfy_*`), nothing else of it; every exported key must be consumed, land on a real
  weight of the original-Wan model and merge to the trained module's forward.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import trained_lora
from safetensors import safe_open

from videoblade.io.lora import (
    LORA_FILE,
    _to_original_module,
    export_comfy,
    load_lora_into,
    read_lora,
    save_lora,
    transformer_lora_state_dict,
)
from videoblade.models import get_adapter
from videoblade.models.tiny import tiny_model_folder

# every module of a Wan transformer the ComfyUI export has a name for, as peft target suffixes
WAN_EXPORTABLE = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                  "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def _load(family):
    folder = tiny_model_folder(family)
    adapter = get_adapter(family)
    return folder, adapter, adapter.load(folder, dtype=torch.float32, components=("transformer",)).transformer




def _forward(adapter, folder, model, family):
    geo = adapter.geometry(folder)
    x = torch.randn(1, *geo.latent_shape, generator=torch.Generator().manual_seed(1))
    dim = model.config.text_dim if family == "wan" else model.config.text_embed_dim
    emb = torch.randn(1, geo.text_tokens or 8, dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return adapter.predict(model, x, torch.tensor([600]), emb, geo, schedule=adapter.schedule(folder))


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# ------------------------------------------------------------------------------------------ diffusers
@pytest.mark.parametrize("family,targets", [("wan", WAN_EXPORTABLE), ("cogvideox", ("to_q", "to_k", "to_v", "to_out.0",
                                                                                      "ff.net.0.proj", "ff.net.2"))])
def test_every_loader_path_gives_the_trained_forward(tmp_path, family, targets):
    # alpha != rank throughout: a scale applied twice or not at all shows in the forward
    folder, adapter, src = _load(family)
    sd = trained_lora(src, 4, 12, targets, seed=7)
    want = _forward(adapter, folder, src, family)
    path = save_lora(tmp_path, sd, family=family, rank=4, alpha=12, target_modules=list(targets), k_step=4, eta=0.5)
    files = [path]
    if family == "wan":
        files.append(export_comfy(path))
    n_modules = len({re.sub(r"\.lora_[AB]\.weight$", "", k) for k in sd})
    for f in files:
        # diffusers' own loader, nothing of videoblade's
        pipe = adapter.pipeline(folder, torch_dtype=torch.float32)
        pipe.load_lora_weights(str(f.parent), weight_name=f.name)
        wrapped = [n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and "default_0" in m.lora_A]
        assert len(wrapped) == n_modules, f"{f.name}: {len(wrapped)} of {n_modules} modules got the LoRA"
        torch.testing.assert_close(_forward(adapter, folder, pipe.transformer, family), want, rtol=1e-5, atol=1e-5)
        # videoblade's loader, into a bare transformer and into a pipeline
        fresh = _load(family)[2]
        load_lora_into(fresh, f, rank=4)
        torch.testing.assert_close(_forward(adapter, folder, fresh, family), want, rtol=1e-5, atol=1e-5)
        pipe = adapter.pipeline(folder, torch_dtype=torch.float32)
        load_lora_into(pipe, f, rank=4)
        torch.testing.assert_close(_forward(adapter, folder, pipe.transformer, family), want, rtol=1e-5, atol=1e-5)


def test_loading_a_comfy_file_leaves_the_returned_tensors_as_in_the_file(tmp_path):
    # diffusers' converter scales cross-attention / FFN tensors in place (`*=`); the LoRAInfo that
    # load_lora_into returns must still hold the file's tensors, not half-scaled ones
    folder, adapter, src = _load("wan")
    sd = trained_lora(src, 4, 16, WAN_EXPORTABLE, seed=2)
    comfy = export_comfy(save_lora(tmp_path, sd, family="wan", rank=4, alpha=16))
    info = load_lora_into(_load("wan")[2], comfy, rank=4)
    on_disk, _ = _tensors(comfy)
    assert info.state_dict.keys() == on_disk.keys()
    changed = [k for k in on_disk if not torch.equal(info.state_dict[k], on_disk[k])]
    assert not changed, f"tensors changed by loading: {changed[:3]}"


def test_diffusers_file_without_adapter_metadata_loads_with_the_recorded_alpha_into_a_pipeline(tmp_path):
    # a diffusers-layout file whose lora_adapter_metadata was dropped (re-saved by another tool) but
    # whose videoblade record keeps alpha: pipeline and bare transformer must load it with the same scale
    import json

    from safetensors.torch import save_file

    folder, adapter, src = _load("wan")
    sd = trained_lora(src, 4, 8, ("to_q", "to_k"), seed=5)
    want = _forward(adapter, folder, src, "wan")
    path = tmp_path / LORA_FILE
    save_file({"transformer." + k: v for k, v in sd.items()}, str(path),
              metadata={"format": "pt", "videoblade": json.dumps({"family": "wan", "rank": 4, "lora_alpha": 8.0})})
    info = read_lora(path)
    assert info.layout == "diffusers" and info.adapter_metadata is None and info.alpha == 8.0
    fresh = _load("wan")[2]
    load_lora_into(fresh, path)
    pipe = adapter.pipeline(folder, torch_dtype=torch.float32)
    load_lora_into(pipe, path)
    for model in (fresh, pipe.transformer):
        torch.testing.assert_close(_forward(adapter, folder, model, "wan"), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ ComfyUI
def _original_wan_names(cfg) -> list[str]:
    """Parameter names of the original Wan2.1 model (ComfyUI's `comfy/ldm/wan/model.py` WanModel:
    WanAttentionBlock self_attn/cross_attn q,k,v,o + norm_q/norm_k, norm3 when cross_attn_norm,
    ffn = Sequential(Linear, GELU, Linear), modulation; Head head + modulation; text_embedding /
    time_embedding Sequential(Linear, act, Linear); time_projection Sequential(SiLU, Linear))."""
    names = ["patch_embedding.weight", "patch_embedding.bias", "head.head.weight", "head.head.bias", "head.modulation"]
    for m in ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1"):
        names += [f"{m}.weight", f"{m}.bias"]
    for i in range(cfg.num_layers):
        b = f"blocks.{i}"
        names.append(f"{b}.modulation")
        for attn in ("self_attn", "cross_attn"):
            for p in ("q", "k", "v", "o"):
                names += [f"{b}.{attn}.{p}.weight", f"{b}.{attn}.{p}.bias"]
            if cfg.qk_norm:
                names += [f"{b}.{attn}.norm_q.weight", f"{b}.{attn}.norm_k.weight"]
        if cfg.cross_attn_norm:
            names += [f"{b}.norm3.weight", f"{b}.norm3.bias"]
        for p in ("ffn.0", "ffn.2"):
            names += [f"{b}.{p}.weight", f"{b}.{p}.bias"]
    return names


def _original_to_diffusers(transformer) -> dict[str, str]:
    """original-Wan parameter name -> the diffusers transformer's, through diffusers' single-file converter
    (`convert_wan_transformer_to_diffusers`), checked to be a bijection onto the transformer's state dict."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    out = {}
    for name in _original_wan_names(transformer.config):
        (conv,) = convert_wan_transformer_to_diffusers({name: torch.empty(0)}).keys()
        out[name] = conv
    assert sorted(out.values()) == sorted(transformer.state_dict()), "original-Wan naming does not cover the model"
    return out


def _comfy_key_map(model_sd_keys) -> dict[str, str]:
    """ComfyUI `comfy/lora.py` `model_lora_keys_unet`: the rules that apply to a Wan model (WAN21 has no
    model-specific block there; `unet_to_diffusers` gives nothing for a non-UNet config): for every
    `diffusion_model.X.weight`, `lora_unet_<X with . -> _>` and the generic `diffusion_model.X` map to it;
    non-.weight keys map to themselves."""
    km = {}
    for k in model_sd_keys:
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                km["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
                km[k[:-len(".weight")]] = k
            else:
                km[k] = k
    return km


def _comfy_load_lora(lora: dict[str, torch.Tensor], key_map: dict[str, str]):
    """ComfyUI `comfy/lora.py` `load_lora` with `comfy/weight_adapter/lora.py` `LoRAAdapter.load` (the
    lora_up/lora_down and lora_B/lora_A name pairs): per mapped name x, `x.alpha` (`.item()`) and the
    up/down pair become a patch for the mapped weight; keys no name consumed are only logged
    ("lora key not loaded"), i.e. skipped. Returns (patches {weight key: (up, down, alpha)}, skipped keys)."""
    patches, loaded = {}, set()
    for x, target in key_map.items():
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        for up, down in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if f"{x}{up}" in lora:
                patches[target] = (lora[f"{x}{up}"], lora[f"{x}{down}"], alpha)
                loaded |= {f"{x}{up}", f"{x}{down}"}
                break
    return patches, [k for k in lora if k not in loaded]


def _comfy_merge(weight: torch.Tensor, up, down, alpha, strength=1.0) -> torch.Tensor:
    """`LoRAAdapter.calculate_weight`: W + strength * (alpha / down.shape[0], 1.0 without alpha) * up @ down,
    computed in float32 and cast to the weight's dtype."""
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    diff = torch.mm(up.float().flatten(start_dim=1), down.float().flatten(start_dim=1)).reshape(weight.shape)
    return weight + ((strength * scale) * diff).to(weight.dtype)


def test_comfy_export_names_every_target_after_a_real_original_wan_module():
    # the export's module table against the original-Wan model, for every linear layer a LoRA can target:
    # a name it gives must be that very module in the original naming, the rest must be refused
    _, _, model = _load("wan")
    to_diff = _original_to_diffusers(model)
    from_diff = {v[:-len(".weight")]: k[:-len(".weight")] for k, v in to_diff.items() if k.endswith(".weight")}
    named = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        try:
            orig = _to_original_module(name)
        except ValueError:
            assert not name.startswith("blocks."), f"{name}: a block linear the export refuses"
            continue
        assert from_diff[name] == orig, f"{name} exported as {orig}, but the original-Wan module is {from_diff[name]}"
        named += 1
    assert named == len(WAN_EXPORTABLE) * model.config.num_layers


@pytest.mark.parametrize("dtype,alpha", [(torch.float32, 12), (torch.bfloat16, 4)])
def test_comfy_export_loads_completely_in_comfyui_and_merges_to_the_trained_forward(tmp_path, dtype, alpha):
    folder, adapter, src = _load("wan")
    sd = trained_lora(src, 4, alpha, WAN_EXPORTABLE, seed=11)
    if dtype != torch.float32:  # what was saved is what ComfyUI gets: the source uses the same rounded weights
        with torch.no_grad():
            for n, p in src.named_parameters():
                if "lora_" in n:
                    p.copy_(p.to(dtype).float())
        sd = transformer_lora_state_dict(src)
    want = _forward(adapter, folder, src, "wan")
    comfy = export_comfy(save_lora(tmp_path, sd, family="wan", rank=4, alpha=alpha, k_step=4, eta=0.5,
                                   asa={"enabled": True}, dtype=dtype))
    lora, meta = _tensors(comfy)
    assert all(isinstance(v, str) for v in meta.values())  # safetensors metadata: str -> str only
    for k, v in lora.items():  # up/down in the saved dtype, one float32 scalar alpha per module
        if k.endswith(".alpha"):
            assert v.shape == () and v.dtype == torch.float32 and v.item() == alpha, k
        else:
            assert v.dtype == dtype and v.ndim == 2, k

    base = _load("wan")[2]
    to_diff = _original_to_diffusers(base)
    model_sd = {"diffusion_model." + o: base.state_dict()[d] for o, d in to_diff.items()}
    patches, skipped = _comfy_load_lora(lora, _comfy_key_map(model_sd))
    assert not skipped, f"ComfyUI would skip (\"lora key not loaded\"): {skipped[:4]}"
    assert len(patches) == len(WAN_EXPORTABLE) * base.config.num_layers
    params = dict(base.named_parameters())
    with torch.no_grad():
        for key, (up, down, a) in patches.items():
            w = params[to_diff[key[len("diffusion_model."):]]]
            assert up.shape[0] * down.shape[1] == w.numel() and (up.shape[0], down.shape[1]) == tuple(w.shape), key
            w.copy_(_comfy_merge(w, up, down, a))
    torch.testing.assert_close(_forward(adapter, folder, base, "wan"), want, rtol=1e-4, atol=1e-5)


def test_comfy_export_keys_pass_kijai_wrapper_key_standardisation_unchanged(tmp_path):
    # kijai/ComfyUI-WanVideoWrapper `nodes_model_loading.py` `standardize_lora_key_format` rewrites keys
    # before handing them to ComfyUI's `load_lora_for_models`; these are its rules for keys that do not
    # start with `lycoris_blocks_` / `lora_unet__` (the exported ones don't). Among them `.attn1.` ->
    # `.cross_attn.` (its "finetrainer" rule): a diffusers-named self-attention LoRA would land on the
    # cross-attention, so the export must carry original names that no rule touches.
    _, _, src = _load("wan")
    sd = trained_lora(src, 4, 4, WAN_EXPORTABLE, seed=1)
    lora, _ = _tensors(export_comfy(save_lora(tmp_path, sd, family="wan", rank=4, alpha=4)))

    def standardize(k):
        for a, b in (("transformer.", "diffusion_model."), ("pipe.dit.", "diffusion_model."), ("blocks.", "diffusion_model.blocks."),
                     ("vace_blocks.", "diffusion_model.vace_blocks.")):
            if k.startswith(a):
                k = k.replace(a, b)
        k = k.replace(".default.", ".").replace(".diff_m", ".modulation.diff").replace("base_model.model.", "diffusion_model.")
        if k.startswith("diffusion.model."):
            k = k.replace("diffusion.model.", "diffusion_model.")
        for marker in (".attn1.", ".attn2."):
            if marker in k:
                k = k.replace(marker, ".cross_attn.")
                for a, b in ((".to_k.", ".k."), (".to_q.", ".q."), (".to_v.", ".v."), (".to_out.0.", ".o.")):
                    k = k.replace(a, b)
                break
        for a, b in (("img_attn.proj", "img_attn_proj"), ("img_attn.qkv", "img_attn_qkv"), ("txt_attn.proj", "txt_attn_proj"),
                     ("txt_attn.qkv", "txt_attn_qkv")):
            k = k.replace(a, b)
        return k

    assert not any(k.startswith(("lycoris_blocks_", "lora_unet__")) for k in lora)
    assert {k: standardize(k) for k in lora if standardize(k) != k} == {}
