"""The speed: fast twins of the plain computations in ossgpt.model, each chosen by a runtime switch and tested
against the plain version (tests/test_fast_paths.py, tests/test_mxfp4.py).

    attention.py   fused attention with sinks            twin of model.attention.eager_attention
                                                          RuntimeOptions(attention="sdpa")
    experts.py     sorted dispatch, grouped products     twin of model.moe.Experts.loop
                                                          RuntimeOptions(experts="sorted")
    loss.py        chunked linear cross-entropy          twin of model.model.next_token_loss of the LM head
                                                          RuntimeOptions(loss_chunk_size=C)
    int8.py        int8 weight-only and W8A8 products    twin of F.linear; ossgpt.quant.int8 (--quantize)
    mxfp4.py       the MXFP4 format; packed products     twin of F.linear of the dequantized weight;
                                                          ossgpt.quant.mxfp4 (--mxfp4), checkpoint loading
    native.py      builds and loads csrc/*.cpp           the C++ kernels on CPU (AVX2, AVX-VNNI or AVX-512 VNNI,
                                                          picked at run time): cpu_q8.cpp, MXFP4 or int8 weights
                                                          times activations rounded to int8 per block of 32;
                                                          cpu_attention.cpp, a decoding step's attention (the
                                                          twin of model.attention.eager_attention);
                                                          cpu_elementwise.cpp, RMSNorm, the rotary embedding and
                                                          the visibility mask without gradients (twins of
                                                          model.norms, model.rope, model.attention.allowed_keys)

Kernels are functions of tensors: they import nothing from the rest of ossgpt, and the model imports them.
"""
