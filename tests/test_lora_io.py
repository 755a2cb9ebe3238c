"""LoRA files: diffusers round trip through load_lora_weights, ComfyUI export read back by diffusers'
converter, metadata, layout detection and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import trained_lora
from safetensors import safe_open

from videoblade.io.lora import (
    LORA_FILE,
    LoRAError,
    check_lora,
    export_comfy,
    load_lora_into,
    read_lora,
    save_lora,
)
from videoblade.models import get_adapter
from videoblade.models.tiny import tiny_model_folder


def _lora_params(module, adapter="default"):
    return {n.replace(f".{adapter}", ""): p.detach().clone() for n, p in module.named_parameters()
            if "lora_" in n and f".{adapter}." in n}


def _probe_inputs(adapter, folder, model):
    """(geometry, latents, text embeddings, schedule) for one forward of the tiny model in `folder`."""
    geo = adapter.geometry(folder)
    x = torch.randn(1, *geo.latent_shape, generator=torch.Generator().manual_seed(1))
    return geo, x, torch.randn(1, 8, model.config.text_dim), adapter.schedule(folder)


@pytest.mark.parametrize("family,alpha", [("wan", 64), ("wan", 32), ("cogvideox", 64)])
def test_roundtrip_through_pipeline_load_lora_weights(tmp_path, family, alpha):
    folder = tiny_model_folder(family)
    adapter = get_adapter(family)
    geo = adapter.geometry(folder)
    src = adapter.load(folder, dtype=torch.float32, components=("transformer",)).transformer
    sd = trained_lora(src, 8, alpha, adapter.lora_target_modules)
    path = save_lora(tmp_path, sd, family=family, rank=8, alpha=alpha, k_step=8, eta=0.9,
                     asa={"enabled": True, "pool": 32}, target_modules=list(adapter.lora_target_modules))
    assert path.name == LORA_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["videoblade"])
    assert meta["family"] == family and meta["k_step"] == 8 and meta["eta"] == 0.9
    assert meta["rank"] == 8 and meta["lora_alpha"] == alpha and meta["asa"]["pool"] == 32

    pipe = adapter.pipeline(folder, torch_dtype=torch.float32)
    pipe.load_lora_weights(str(tmp_path))  # diffusers' own loader, nothing of ours
    got = _lora_params(pipe.transformer, "default_0")
    want = _lora_params(src)
    assert got.keys() == want.keys() and len(got) > 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    # the same forward as the trained module (alpha != rank needs the recorded scale)
    x = torch.randn(1, *geo.latent_shape, generator=torch.Generator().manual_seed(1))
    emb_dim = src.config.text_dim if family == "wan" else src.config.text_embed_dim
    emb = torch.randn(1, geo.text_tokens or 8, emb_dim)
    t = torch.tensor([500])
    sched = adapter.schedule(folder)
    with torch.no_grad():
        a = adapter.predict(src, x, t, emb, geo, schedule=sched)
        b = adapter.predict(pipe.transformer, x, t, emb, geo, schedule=sched)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [4, 16])
def test_comfy_export_read_back_by_diffusers_converter(tmp_path, alpha):
    folder = tiny_model_folder("wan")
    adapter = get_adapter("wan")
    src = adapter.load(folder, dtype=torch.float32, components=("transformer",)).transformer
    sd = trained_lora(src, 4, alpha, ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"), seed=3)
    path = save_lora(tmp_path, sd, family="wan", rank=4, alpha=alpha, k_step=8, eta=0.9)
    comfy = export_comfy(path)
    info = read_lora(comfy)
    assert info.layout == "wan_original" and info.family == "wan" and info.alpha == alpha
    keys = set(info.state_dict)
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in keys
    assert "diffusion_model.blocks.1.cross_attn.o.lora_up.weight" in keys
    assert "diffusion_model.blocks.0.ffn.0.alpha" in keys
    from diffusers import WanPipeline

    conv, _ = WanPipeline.lora_state_dict(str(comfy), return_lora_metadata=True)
    orig = read_lora(path).state_dict
    assert {k.replace("transformer.", "", 1) for k in conv} == {k.replace("transformer.", "", 1) for k in orig}
    scale = alpha / 4
    for k, v in orig.items():
        if not k.endswith("lora_A.weight"):
            continue
        kb = k.replace("lora_A", "lora_B")
        kc = k if k in conv else k.replace("transformer.", "", 1)
        kcb = kc.replace("lora_A", "lora_B")
        delta_orig = scale * orig[kb] @ v  # the effective weight update
        delta_conv = conv[kcb] @ conv[kc]  # converted file loads with alpha = rank (scale 1)
        torch.testing.assert_close(delta_conv, delta_orig, rtol=1e-6, atol=1e-7)
    if alpha == 4:  # alpha == rank: the converter returns the very same tensors
        for k in orig:
            torch.testing.assert_close(conv.get(k, conv.get(k.replace("transformer.", "", 1))), orig[k], rtol=0, atol=0)
    # and a pipeline loads the ComfyUI file to the same forward as the trained module
    pipe = adapter.pipeline(folder, torch_dtype=torch.float32)
    load_lora_into(pipe, comfy, rank=4)
    geo, x, emb, sched = _probe_inputs(adapter, folder, src)
    with torch.no_grad():
        a = adapter.predict(src, x, torch.tensor([300]), emb, geo, schedule=sched)
        b = adapter.predict(pipe.transformer, x, torch.tensor([300]), emb, geo, schedule=sched)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_loader_detects_layouts_and_checks_family_and_rank(tmp_path):
    folder = tiny_model_folder("wan")
    adapter = get_adapter("wan")
    src = adapter.load(folder, dtype=torch.float32, components=("transformer",)).transformer
    sd = trained_lora(src, 4, 8, adapter.lora_target_modules)
    path = save_lora(tmp_path, sd, family="wan", rank=4, alpha=8)
    info = read_lora(tmp_path)
    assert info.layout == "diffusers" and info.rank == 4 and info.alpha == 8 and info.family == "wan"
    check_lora(info, family="tiny-wan", rank=4)
    with pytest.raises(LoRAError, match="for a wan model, not for cogvideox"):
        check_lora(info, family="cogvideox")
    with pytest.raises(LoRAError, match="rank 4, expected 64"):
        check_lora(info, rank=64)
    cog = get_adapter("cogvideox").load(tiny_model_folder("cogvideox"), dtype=torch.float32,
                                        components=("transformer",)).transformer
    with pytest.raises(LoRAError, match="wan model"):
        load_lora_into(cog, path)
    # into a bare transformer as a named adapter: same weights, alpha kept
    fresh = adapter.load(folder, dtype=torch.float32, components=("transformer",)).transformer
    load_lora_into(fresh, path, adapter_name="student", rank=4)
    got, want = _lora_params(fresh, "student"), _lora_params(src)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    assert fresh.peft_config["student"].lora_alpha == 8
    with pytest.raises(LoRAError, match="not found"):
        read_lora(tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"")
    with pytest.raises(LoRAError, match="not a readable safetensors"):
        read_lora(tmp_path / "bad.safetensors")
    with pytest.raises(LoRAError, match="rank 5 but rank=4"):
        save_lora(tmp_path / "x", {"blocks.0.attn1.to_q.lora_A.weight": torch.zeros(5, 8)}, family="wan", rank=4,
                  alpha=4)
    with pytest.raises(LoRAError, match="Wan only"):
        cpath = save_lora(tmp_path / "c", {"transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 8),
                                           "transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(8, 4)},
                          family="cogvideox", rank=4, alpha=4)
        export_comfy(cpath)


def test_bare_peft_layout_keeps_family_alpha_and_loads_into_a_pipeline(tmp_path):
    # a LoRA saved as bare peft keys (`blocks.0.attn1.to_q.lora_A.weight`, e.g. straight from
    # get_peft_model_state_dict) with alpha != rank recorded only in the videoblade record
    from safetensors.torch import save_file

    folder = tiny_model_folder("wan")
    adapter = get_adapter("wan")
    src = adapter.load(folder, dtype=torch.float32, components=("transformer",)).transformer
    sd = trained_lora(src, 4, 8, adapter.lora_target_modules, seed=5)
    assert all(k.startswith("blocks.") for k in sd)
    path = tmp_path / "bare.safetensors"
    save_file(sd, str(path), metadata={"format": "pt", "videoblade": json.dumps({"rank": 4, "lora_alpha": 8.0})})
    info = read_lora(path)
    assert info.layout == "peft" and info.rank == 4 and info.alpha == 8.0
    assert info.family == "wan"  # guessed from the module names, as for the diffusers layout
    with pytest.raises(LoRAError, match="wan model"):
        check_lora(info, family="cogvideox")
    geo, x, emb, sched = _probe_inputs(adapter, folder, src)
    with torch.no_grad():
        want = adapter.predict(src, x, torch.tensor([400]), emb, geo, schedule=sched)
    # into a bare transformer: the recorded alpha (scale 2), not alpha = rank
    fresh = adapter.load(folder, dtype=torch.float32, components=("transformer",)).transformer
    load_lora_into(fresh, path, adapter_name="student")
    assert fresh.peft_config["student"].lora_alpha == 8
    # into a pipeline: the weights actually arrive (diffusers' loader finds no `transformer.` keys in a bare file)
    pipe = adapter.pipeline(folder, torch_dtype=torch.float32)
    load_lora_into(pipe, path, adapter_name="student")
    got = _lora_params(pipe.transformer, "student")
    assert got.keys() == _lora_params(src).keys()
    with torch.no_grad():
        for model in (fresh, pipe.transformer):
            torch.testing.assert_close(adapter.predict(model, x, torch.tensor([400]), emb, geo, schedule=sched), want,
                                       rtol=1e-5, atol=1e-5)


def test_comfy_export_of_a_run_folder_lands_inside_it(tmp_path):
    # read_lora takes a folder holding pytorch_lora_weights.safetensors; so does export_comfy, and the
    # ComfyUI file goes beside that file (inside the folder), not beside the folder
    run = tmp_path / "run"
    save_lora(run, {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 8),
                    "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.ones(8, 4)}, family="wan", rank=4, alpha=4)
    out = export_comfy(run)
    assert out == run / "lora_comfy.safetensors" and out.is_file()
    assert read_lora(out).layout == "wan_original"
