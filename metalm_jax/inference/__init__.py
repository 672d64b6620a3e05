"""metalm_jax.inference: generation over KV caches (greedy, sampling, beam search), PPLM.

  decoding        the core every model shares: `generate_from_prefill(decode_fn, logits,
                  cache, ...)` -> (tokens [B, K, N], scores [B, K]); `sample_logits`
  generate        plain decoders (Decoder, HybridDecoder), equal-length prompts
  beam_search     beam search with the GNMT length penalty (`beam_search_from_logits`)
  metalm_prompts  METALM prompts with encoder spans (text, vision-language), padded layouts
  metalm          METALM generation: left-padded span prompts, KV cache, `greedy_reference`
  mplug           mPLUG generation, answer ranking, deterministic retrieval
  pplm            plug-and-play steering of a decoder
"""
from metalm_jax.inference import metalm, metalm_prompts, mplug
from metalm_jax.inference.beam_search import (BeamSearchOutput, beam_search,
                                              beam_search_from_logits)
from metalm_jax.inference.decoding import check_sampling, generate_from_prefill, sample_logits
from metalm_jax.inference.generate import generate
from metalm_jax.inference.metalm_prompts import SpanPrompt, text_prompt, vl_prompt

__all__ = ['BeamSearchOutput', 'SpanPrompt', 'beam_search', 'beam_search_from_logits',
           'check_sampling', 'generate', 'generate_from_prefill', 'metalm', 'metalm_prompts',
           'mplug', 'sample_logits', 'text_prompt', 'vl_prompt']
