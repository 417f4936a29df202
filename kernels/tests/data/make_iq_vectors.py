# Test vectors for the i-quants' dequantization, from gguf-py (pip install gguf), an
# implementation independent of qwen-run's: `python3 make_iq_vectors.py DIR` writes, for each
# type, random blocks (`NAME.blocks`) and gguf-py's values of them (`NAME.gguf_py.f32`), and
# gguf-py's grid and sign tables (`iq_grids.gguf_py.i8`: the grids of IQ2_XXS, IQ2_XS, IQ2_S,
# IQ3_XXS, IQ3_S and IQ1_S in that order, one byte per value, then the 128 sign bytes).
import numpy as np, sys
from gguf import quants, GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
rng = np.random.default_rng(20261207)
out = sys.argv[1]
def d_bytes(n):
    mag = rng.uniform(1e-4, 0.05, n) * rng.choice([-1, 1], n)
    return mag.astype(np.float16).view(np.uint8).reshape(n, 2)
# IQ4_NL: 64 blocks of 18 bytes
n = 64
nl = np.concatenate([d_bytes(n), rng.integers(0, 256, (n, 16), dtype=np.uint8)], axis=1)
nl[0, 2:] = np.arange(16, dtype=np.uint8) | (np.arange(16, dtype=np.uint8)[::-1] << 4)
# IQ4_XS: 16 blocks of 136 bytes; every 6-bit scale value appears
n = 16
xs = np.concatenate([d_bytes(n), rng.integers(0, 256, (n, 134), dtype=np.uint8)], axis=1)
ls = (np.arange(n * 8) % 64).astype(np.uint16).reshape(n, 8)
for b in range(n):
    h = 0
    for j in range(8):
        h |= int(ls[b, j] >> 4) << (2 * j)
    xs[b, 2:4] = np.frombuffer(np.uint16(h).tobytes(), np.uint8)
    for j in range(4):
        xs[b, 4 + j] = (ls[b, 2 * j] & 15) | ((ls[b, 2 * j + 1] & 15) << 4)
sets = [("iq4_nl", T.IQ4_NL, nl), ("iq4_xs", T.IQ4_XS, xs)]
# The 256-value types: 48 blocks of random bytes each (every index, sign and scale bit pattern
# occurs many times), d a sane f16 (IQ1_M: its 16 bits spread over the top nibbles of the four
# scale words)
for name, ty in [("iq3_xxs", T.IQ3_XXS), ("iq3_s", T.IQ3_S), ("iq2_xxs", T.IQ2_XXS),
                 ("iq2_xs", T.IQ2_XS), ("iq2_s", T.IQ2_S), ("iq1_s", T.IQ1_S), ("iq1_m", T.IQ1_M)]:
    n, size = 48, GGML_QUANT_SIZES[ty][1]
    b = rng.integers(0, 256, (n, size), dtype=np.uint8)
    d = d_bytes(n)
    if ty == T.IQ1_M:
        bits = d.view(np.uint16).reshape(n)
        sc = b[:, 48:56].copy().view(np.uint16) & np.uint16(0x0FFF)
        for k in range(4):
            sc[:, k] |= ((bits >> np.uint16(4 * k)) & np.uint16(0xF)) << np.uint16(12)
        b[:, 48:56] = sc.view(np.uint8)
    else:
        b[:, 0:2] = d
    sets.append((name, ty, b))
for name, ty, blocks in sets:
    vals = quants.dequantize(blocks.reshape(-1), ty).astype(np.float32).reshape(-1)
    blocks.tofile(f"{out}/{name}.blocks")
    vals.astype("<f4").tofile(f"{out}/{name}.gguf_py.f32")
    print(name, blocks.shape, vals.shape, vals[:4])
grids = []
for ty in [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S]:
    c = quants._type_traits[ty]
    c.init_grid()
    grids.append(c.grid.reshape(-1).astype(np.int8))
grids.append(np.frombuffer(quants.IQ2_XXS.ksigns, np.uint8).view(np.int8))
np.concatenate(grids).tofile(f"{out}/iq_grids.gguf_py.i8")
