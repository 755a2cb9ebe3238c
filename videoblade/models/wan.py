"""Wan2.1 text-to-video adapter (`WanTransformer3DModel`, `AutoencoderKLWan`, UMT5).

Layout [B, C, F, H, W] throughout; patch (1, 2, 2) from `transformer.config.patch_size`; text
enters by cross-attention (0 text tokens in self-attention); the timestep input is the flow
sigma x 1000 (a float), as `WanPipeline` passes it; latents are normalised by the VAE's
`latents_mean` / `latents_std`.
"""

from __future__ import annotations

import functools
import warnings

import torch

from videoblade.models.base import (
    ModelAdapter,
    ModelInfo,
    ModelRequestError,
    VideoGeometry,
    raise_recompile_limit,
    register_adapter,
)


def _rms_norm_fused(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, scale: float,
                    dim: int, pre_bias: torch.Tensor | None = None, silu: bool = False) -> torch.Tensor:
    """WanRMS_norm's math in one pass: float32 statistics, output in the input dtype (diffusers'
    forward casts to float32, normalizes, casts back, then scales and shifts: 5 passes). With
    ``pre_bias`` (the bias of the convolution before it, over dim 1) and ``silu`` (the activation
    after it) it also takes the two passes around it. A free function of tensors, so that one
    compiled graph serves every norm of the decoder."""
    xf = x.float()
    if pre_bias is not None:
        xf = xf + _per_channel(pre_bias, x)
    out = xf * torch.rsqrt(xf.square().sum(dim, keepdim=True).clamp_min(1e-24)) * (scale * gamma.float())
    if bias is not None:
        out = out + bias.float()
    if silu:
        out = torch.nn.functional.silu(out)
    return out.to(x.dtype)


def _per_channel(b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector (a convolution's bias) in float32, broadcastable over x [B, C, ...]."""
    return b.float().view(-1, *([1] * (x.dim() - 2)))


def _bias_residual_add(x: torch.Tensor, bias: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """A convolution's output without its bias, plus the bias and the residual, in one pass."""
    return (x.float() + _per_channel(bias, x) + h.float()).to(x.dtype)


def _norm_bias(m) -> torch.Tensor | None:
    return m.bias if isinstance(m.bias, torch.Tensor) else None


def _norm_forward(m, fused, x):
    return fused(x, m.gamma, _norm_bias(m), m.scale, 1 if m.channel_first else -1)


@functools.cache
def _compiled(fn, backend: str):
    return torch.compile(fn, backend=backend, dynamic=True)


def _cached_conv(conv, x: torch.Tensor, feat_cache, feat_idx) -> torch.Tensor:
    """A causal convolution without its bias, with diffusers' feature-cache bookkeeping (the last
    two input frames are kept for the next call; WanResidualBlock.forward)."""
    if feat_cache is None:
        return _causal_conv_forward(conv, x, with_bias=False)
    idx = feat_idx[0]
    cache_x = x[:, :, -2:].clone()
    if cache_x.shape[2] < 2 and feat_cache[idx] is not None:
        cache_x = torch.cat([feat_cache[idx][:, :, -1:].to(cache_x.device), cache_x], dim=2)
    out = _causal_conv_forward(conv, x, feat_cache[idx], with_bias=False)
    feat_cache[idx] = cache_x
    feat_idx[0] += 1
    return out


def _residual_forward(m, norm, add, x: torch.Tensor, feat_cache=None, feat_idx=[0]) -> torch.Tensor:  # noqa: B006
    """``WanResidualBlock.forward`` (norm, SiLU, conv, norm, SiLU, conv, + shortcut) with each
    convolution's bias added inside the compiled pass that follows it: bias + norm + SiLU after
    the first, bias + residual after the second. cuDNN convolutions in PyTorch add their bias in a
    separate pass over the output, and the activation is one more: four full passes fewer per
    block. The same function with float32 in place of two bf16 roundings (benchmarks/e2e.py, Wan
    81x480x832 bf16 on an H200, norms compiled, all frames per call: 0.99 s at da822a5, 0.90 s at
    1011175; PSNR against fp32 48.5 -> 49.5 dB)."""
    h = m.conv_shortcut(x)
    x = norm(x, m.norm1.gamma, _norm_bias(m.norm1), m.norm1.scale, 1, None, True)
    x = _cached_conv(m.conv1, x, feat_cache, feat_idx)
    x = norm(x, m.norm2.gamma, _norm_bias(m.norm2), m.norm2.scale, 1, m.conv1.bias, True)
    x = _cached_conv(m.conv2, x, feat_cache, feat_idx)
    return add(x, m.conv2.bias, h)


def _fusable_residual(m) -> bool:
    """A WanResidualBlock shaped as _residual_forward assumes (as in diffusers 0.42; anything else
    keeps diffusers' forward with its norms compiled alone)."""
    def conv(c):
        return _is_causal_conv(c) and c.bias is not None

    def norm(n):
        return type(n).__name__ == "WanRMS_norm" and n.channel_first

    return (conv(getattr(m, "conv1", None)) and conv(getattr(m, "conv2", None))
            and norm(getattr(m, "norm1", None)) and norm(getattr(m, "norm2", None))
            and isinstance(getattr(m, "nonlinearity", None), torch.nn.SiLU)
            and (not m.training or getattr(m.dropout, "p", 0.0) == 0.0))


_CHUNK_ATTR = "_videoblade_decode_chunk"  # the setting ("auto", "all" or int), set by configure_decode_chunk
_CHUNK_CAP_ATTR = "_videoblade_decode_chunk_cap"  # "auto" after running out of memory: the chunk that fitted
_CHUNK_USED_ATTR = "_videoblade_decode_chunk_used"  # latent frames per call of the last decode (for reports)
_FAST_ATTR = "_videoblade_fast_decode"  # _prepare_fast_decode has run on this VAE


def _is_causal_conv(m) -> bool:
    """A ``WanCausalConv3d`` with the 6-entry ``_padding`` that ``_causal_conv_forward`` reads."""
    return type(m).__name__ == "WanCausalConv3d" and len(getattr(m, "_padding", ())) == 6


def _causal_conv_forward(m, x: torch.Tensor, cache_x: torch.Tensor | None = None,
                         with_bias: bool = True) -> torch.Tensor:
    """``WanCausalConv3d.forward`` with its symmetric spatial zero padding done inside the
    convolution, and the causal history (zero frames, then the cached frames) prepended in one
    ``cat`` (short inputs) or not copied at all (long ones): diffusers concatenates the cache and
    then pads time and space with ``F.pad``, two full copies of the activation per convolution
    (three when the cache is shorter than the padding). ``with_bias=False`` leaves the bias out
    (``_residual_forward`` adds it in the pass after)."""
    pad_w, _, pad_h, _, pad_t, _ = m._padding
    bias = m.bias if with_bias else None
    conv3d = torch.nn.functional.conv3d
    if pad_t > 0 and x.shape[2] > 4 * pad_t and m.stride[0] == 1 and m.dilation[0] == 1:
        # long inputs: no copy at all. The convolution pads time on both sides, so its first T
        # outputs are the causal ones with a zero history; the first pad_t of them are then redone
        # from [history, first frames] when the history is not all zeros (a few frames' work).
        frames = x.shape[2]
        out = conv3d(x, m.weight, bias, m.stride, (pad_t, pad_h, pad_w), m.dilation, m.groups)[:, :, :frames]
        if cache_x is not None and cache_x.shape[2] > 0:
            head = _causal_conv_forward(m, x[:, :, :pad_t], cache_x, with_bias)  # short: the cat path below
            out[:, :, :pad_t] = head
        return out
    if pad_t > 0:
        parts = [] if cache_x is None else [cache_x.to(x.device)]
        missing = pad_t - sum(p.shape[2] for p in parts)
        if missing > 0:
            zeros = x.new_zeros((x.shape[0], x.shape[1], missing, *x.shape[3:]))
            if x.is_contiguous(memory_format=torch.channels_last_3d):
                zeros = zeros.contiguous(memory_format=torch.channels_last_3d)
            parts.insert(0, zeros)
        x = torch.cat([*parts, x], dim=2)
    return conv3d(x, m.weight, bias, m.stride, (0, pad_h, pad_w), m.dilation, m.groups)


def _phase_taps(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3 taps of ``w`` along ``dim`` as seen by a 2x nearest-upsampled input, per output
    phase: even outputs read low-resolution positions (i-1, i) with taps (0 | 1+2), odd outputs
    (i, i+1) with taps (0+1 | 2)."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack((t0, t1 + t2), dim), torch.stack((t0 + t1, t2), dim)


def _upsample2x_conv(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(nearest_upsample_2x(x))`` for a 3x3, stride-1, zero-padded ``conv``, without the
    upsampled tensor. Each output pixel phase (row parity a, column parity b) is a 2x2
    convolution of the low-resolution input whose taps are sums of the 3x3 taps; the four phases
    run as one convolution with 4x the output channels (2.25x fewer multiply-adds, a GEMM 4x
    wider), then land interleaved, bias added, in a channels-last output. Same function to float
    rounding (the summed taps are rounded once to the weight dtype)."""
    n, _, h, w = x.shape
    cout = conv.out_channels
    # [O, I, 3, 3] -> 4 phase kernels [O, I, 2, 2], stacked as output channels (2a + b) * O + o
    k = torch.cat([kb for ka in _phase_taps(conv.weight.float(), 2) for kb in _phase_taps(ka, 3)])
    k = k.to(x.dtype).contiguous(memory_format=torch.channels_last)
    # padding 1 gives (h+1) x (w+1) outputs; phase (a, b) is the window starting at (a, b)
    phases = torch.nn.functional.conv2d(x, k, None, 1, 1)
    out = x.new_empty((n, h, 2, w, 2, cout))  # the memory of [N, C, 2h, 2w] channels-last
    bias = None if conv.bias is None else conv.bias.to(x.dtype)
    for a in (0, 1):
        for b in (0, 1):
            i = 2 * a + b
            src = phases[:, i * cout:(i + 1) * cout, a:a + h, b:b + w].permute(0, 2, 3, 1)
            if bias is None:
                out[:, :, a, :, b].copy_(src)
            else:
                torch.add(src, bias, out=out[:, :, a, :, b])
    return out.view(n, 2 * h, 2 * w, cout).permute(0, 3, 1, 2)


def _upsample_conv_of(m):
    """The 3x3 convolution of a WanResample's [nearest 2x upsample, conv] pair, or None when the
    pair is not shaped as ``_upsample2x_conv`` assumes."""
    seq = getattr(m, "resample", None)
    if getattr(m, "mode", None) not in ("upsample2d", "upsample3d") or not isinstance(seq, torch.nn.Sequential):
        return None
    if len(seq) != 2 or not isinstance(seq[1], torch.nn.Conv2d):
        return None
    up, conv = seq
    if not (isinstance(up, torch.nn.Upsample) and up.mode in ("nearest", "nearest-exact") and up.size is None
            and tuple(up.scale_factor if isinstance(up.scale_factor, tuple) else (up.scale_factor,) * 2) == (2.0, 2.0)):
        return None
    if not (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"):
        return None
    if m.mode == "upsample3d" and not _is_causal_conv(getattr(m, "time_conv", None)):
        return None
    return conv


def _resample_forward(m, x: torch.Tensor, feat_cache=None, feat_idx=[0]) -> torch.Tensor:  # noqa: B006
    """``WanResample.forward`` for its upsampling modes, with the same feature-cache bookkeeping.
    diffusers interleaves the temporal upsampler's two frame sets with ``stack`` into a
    channels-first tensor, upsamples it 4x in size, and the convolution converts that back to
    channels-last: here the interleave is one copy (with the time convolution's bias added in
    it) into channels-last, and the upsample + convolution run as ``_upsample2x_conv``."""
    b, c, t, h, w = x.shape
    if m.mode == "upsample3d" and feat_cache is not None:
        idx = feat_idx[0]
        if feat_cache[idx] is None:  # the first chunk: its one frame is not upsampled in time
            feat_cache[idx] = "Rep"
            feat_idx[0] += 1
        else:
            if isinstance(feat_cache[idx], str):  # "Rep": no history yet, the causal zero padding
                feat_cache[idx] = None  # (diffusers keeps [zeros, frame]; one frame pads the same)
            y = _cached_conv(m.time_conv, x, feat_cache, feat_idx)
            # [B, 2C, T] -> [B, C, 2T]: video frame 2i + j is channels j*C:(j+1)*C of frame i
            inter = x.new_empty((b, t, 2, h, w, c))  # the memory of [B, C, 2T, H, W] channels-last
            src = y.unflatten(1, (2, c)).permute(0, 3, 1, 4, 5, 2)
            bias = m.time_conv.bias
            if bias is None:
                inter.copy_(src)
            else:
                torch.add(src, bias.view(2, 1, 1, c).to(x.dtype), out=inter)
            t = 2 * t
            x = inter.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    out = _upsample2x_conv(m.resample[1], frames)
    return out.unflatten(0, (b, t)).permute(0, 2, 1, 3, 4)


def _prepare_fast_decode(vae) -> None:
    """Once per VAE, for videoblade's decode loop: convolution weights channels-last (cuDNN's
    layout; the activations follow, so no NCDHW <-> NDHWC conversion per convolution), spatial
    padding inside the convolutions, and nearest upsampling without its float32 round trip (exact
    for nearest). Same function to float rounding (benchmarks/e2e.py on an H200, Wan 81x480x832 bf16
    with the norms compiled and all frames per call: 1.29 s without these at 2d7de2e, 1.11 s with
    them at 1a347da, 1.09 s with the one-cat history at 27a3c81, 0.99 s with no history copy for long
    inputs at da822a5; 0.90 s at 1011175 with the residual blocks' passes fused, ``_residual_forward``;
    0.73 s at b3cd8f9 with the upsamplers as phase convolutions, ``_resample_forward``, and the frames
    copied out through page-locked memory; PSNR against fp32 49.5 -> 49.4 dB)."""
    if getattr(vae, _FAST_ATTR, False):
        return
    for m in vae.decoder.modules():
        if _is_causal_conv(m):
            m.forward = functools.partial(_causal_conv_forward, m)
        if type(m).__name__ == "WanUpsample" and m.mode in ("nearest", "nearest-exact"):
            m.forward = functools.partial(torch.nn.Upsample.forward, m)
        if type(m).__name__ == "WanResample" and _upsample_conv_of(m) is not None:
            m.forward = functools.partial(_resample_forward, m)
        if isinstance(m, torch.nn.Conv3d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
        elif isinstance(m, torch.nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    setattr(vae, _FAST_ATTR, True)


def _decode_in_chunks(vae, z: torch.Tensor, chunk: int) -> torch.Tensor:
    """``AutoencoderKLWan._decode`` with ``chunk`` latent frames per decoder call after the first.

    diffusers calls the causal decoder once per latent frame, carrying the last two frames of every
    causal convolution's input in a feature cache. Every piece of that cache logic takes any number
    of frames per call, and the temporal upsampler must see the first latent frame alone (it maps to
    one video frame), so the first frame goes alone and the rest in calls of ``chunk``: the same
    function with larger convolutions and fewer launches (equal to float rounding). Activations
    run channels-last (``_prepare_fast_decode``)."""
    _prepare_fast_decode(vae)
    vae.clear_cache()
    try:
        x = vae.post_quant_conv(z).contiguous(memory_format=torch.channels_last_3d)
        frames = x.shape[2]
        outs = []
        start = 0
        while start < frames:
            stop = 1 if start == 0 else min(start + chunk, frames)
            vae._conv_idx = [0]
            outs.append(vae.decoder(x[:, :, start:stop], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                    first_chunk=start == 0))
            start = stop
        return torch.cat(outs, 2).clamp_(-1.0, 1.0)
    finally:
        vae.clear_cache()


def _auto_chunk(vae, z: torch.Tensor) -> int:
    # all frames on CUDA (at most what fitted before); on the CPU, where running out of memory
    # cannot be caught, diffusers' one frame per call
    frames = z.shape[2]
    return min(frames, getattr(vae, _CHUNK_CAP_ATTR, frames)) if z.is_cuda else 1


def _chunked_decode_applies(vae) -> bool:
    # diffusers' internals this relies on, no tiling (its own loop) and no patchified VAE (Wan2.2).
    # Not _feat_map: clear_cache() creates it, so a VAE that has never decoded lacks it (requiring it
    # sent every run's first decode down diffusers' one-frame loop)
    return (all(hasattr(vae, a) for a in ("clear_cache", "post_quant_conv", "decoder"))
            and not getattr(vae, "use_tiling", False)
            and getattr(vae.config, "patch_size", None) is None)


@register_adapter
class WanAdapter(ModelAdapter):
    family = "wan"
    transformer_classes = ("WanTransformer3DModel",)
    default_size = (480, 832, 81)
    default_cfg = 5.0
    default_text_max_length = 512
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    blocks_attr = "blocks"
    pipeline_class = "WanPipeline"
    text_encoder_class = "UMT5EncoderModel"

    def compile_vae(self, vae, backend: str = "inductor") -> int:
        """Compile the decoder's RMS norms only, each fused into one kernel (dynamic shapes: one
        graph for every resolution); in the residual blocks the passes around them too (conv bias,
        SiLU, residual add: ``_residual_forward``). The Wan decoder as a whole compiles badly: its
        per-frame feature cache recompiles it per call (Wan 81x480x832 bf16 on an H200, diffusers'
        loop: 1.89 s eager, 1.80 s whole-decoder compiled after ~88 s of compiles, 1.59 s with the
        norms compiled after ~20 s, 1.40 s with the residual blocks' passes too after ~45 s; 1.30 s
        at b3cd8f9, whose decode copies the frames out through page-locked memory).
        Returns the number of norms that now run fused."""
        decoder = getattr(vae, "decoder", None)
        if decoder is None:
            return 0
        raise_recompile_limit(64)  # a graph per norm width (scale) and per size-1 specialisation
        norm, add = _compiled(_rms_norm_fused, backend), _compiled(_bias_residual_add, backend)
        n = 0
        for m in decoder.modules():  # parents come before their children
            if getattr(m, "_videoblade_fused", False):
                continue
            if type(m).__name__ == "WanResidualBlock" and _fusable_residual(m):
                m.forward = functools.partial(_residual_forward, m, norm, add)
                for inner in (m, m.norm1, m.norm2):  # its norms now run inside its forward
                    inner._videoblade_fused = True
                n += 2
            elif type(m).__name__ == "WanRMS_norm":
                m.forward = functools.partial(_norm_forward, m, norm)
                m._videoblade_fused = True
                n += 1
        return n

    supports_decode_chunk = True

    def configure_decode_chunk(self, vae, chunk="auto") -> None:
        """Latent frames per decoder call after the first: an int, "all", or "auto" (all frames on
        CUDA, halved after running out of memory until it fits; 1 elsewhere, diffusers' own loop).
        Anything but 1 runs videoblade's loop (``_decode_in_chunks``, channels-last); 1 is diffusers'
        own. Wan 81x480x832 bf16 with the norms compiled on an H200 (benchmarks/e2e.py at b3cd8f9):
        diffusers' loop 1.30 s with 4.4 GiB of decode memory, all 20 frames in one call 0.73 s with
        25 GiB."""
        setattr(vae, _CHUNK_ATTR, self.check_decode_chunk(chunk))
        if hasattr(vae, _CHUNK_CAP_ATTR):
            delattr(vae, _CHUNK_CAP_ATTR)

    def last_decode_chunk(self, vae) -> int | None:
        return getattr(vae, _CHUNK_USED_ATTR, None)

    def vae_decode(self, vae, z: torch.Tensor) -> torch.Tensor:
        setting = getattr(vae, _CHUNK_ATTR, "auto")
        frames = z.shape[2]
        if setting == "auto":
            chunk = _auto_chunk(vae, z)
        else:
            chunk = frames if setting == "all" else int(setting)
        chunk = min(chunk, frames - 1)  # the first latent frame always goes alone
        if chunk > 1 and _chunked_decode_applies(vae):
            if getattr(vae, "use_slicing", False) and z.shape[0] > 1:
                return torch.cat([self.vae_decode(vae, z[i : i + 1]) for i in range(z.shape[0])])
            while chunk > 1:
                try:
                    out = _decode_in_chunks(vae, z, chunk)
                    setattr(vae, _CHUNK_USED_ATTR, chunk)
                    return out
                except torch.OutOfMemoryError:
                    if setting != "auto":
                        raise
                # out of the except block, so the failed attempt's tensors are free
                torch.cuda.empty_cache()
                warnings.warn(f"Wan VAE decode ran out of GPU memory with {chunk} latent frames per call; "
                              f"retrying with {chunk // 2} (set the decode chunk to fix it)", stacklevel=2)
                chunk //= 2
                setattr(vae, _CHUNK_CAP_ATTR, chunk)
        setattr(vae, _CHUNK_USED_ATTR, 1)  # diffusers' own loop
        return super().vae_decode(vae, z)

    def vae_factors(self, info: ModelInfo) -> tuple[int, int]:
        v = info.vae_config
        if v is None:
            raise ModelRequestError(f"{info.folder} has no vae/config.json: the VAE config sets the latent shape")
        temporal = v.get("scale_factor_temporal") or 2 ** sum(bool(d) for d in v.get("temperal_downsample", []))
        spatial = v.get("scale_factor_spatial") or 2 ** (len(v.get("dim_mult", [1, 2, 4, 4])) - 1) * int(
            v.get("patch_size") or 1)
        return int(temporal), int(spatial)

    def latent_channels(self, info: ModelInfo) -> int:
        return int(info.transformer_config.get("in_channels", (info.vae_config or {}).get("z_dim", 16)))

    def patch_size(self, info: ModelInfo) -> tuple[int, int, int]:
        p = info.transformer_config.get("patch_size", (1, 2, 2))
        return tuple(int(x) for x in p)  # type: ignore[return-value]

    def encode_prompts(self, text_encoder, tokenizer, prompts, max_length=None, device=None, dtype=None):
        # diffusers WanPipeline._get_t5_prompt_embeds: cleaned prompts, attention mask, padding zeroed
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        max_length = int(max_length or self.default_text_max_length)
        enc_device = next(text_encoder.parameters()).device
        prompts = [prompt_clean(p) for p in prompts]
        self.warn_if_truncated(tokenizer, prompts, max_length)
        inputs = tokenizer(prompts, padding="max_length", max_length=max_length,
                           truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = inputs.input_ids.to(enc_device), inputs.attention_mask.to(enc_device)
        with torch.no_grad():
            emb = text_encoder(ids, mask).last_hidden_state
        # == the pipeline's u[:len] then zero padding; a fill, not a product with the mask, so that a
        # non-finite padded row (a T5 overflowing in fp16) becomes zeros there too, not NaN
        emb = emb.masked_fill(~mask.gt(0).unsqueeze(-1), 0.0)
        return emb.to(device=device or enc_device, dtype=dtype or emb.dtype)

    def predict(self, transformer, x_t, t, prompt_embeds, geometry: VideoGeometry, attention_kwargs=None,
                schedule=None):
        _, timestep, x, emb = self._model_inputs(transformer, x_t, t, prompt_embeds, geometry, schedule)
        out = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=emb,
                          attention_kwargs=attention_kwargs, return_dict=False)[0]
        return out.float()
