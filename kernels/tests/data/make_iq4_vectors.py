# Test vectors for IQ4_NL / IQ4_XS dequantization, from gguf-py (pip install gguf), an
# implementation independent of qwen-run's.
import numpy as np, sys
from gguf import quants, GGMLQuantizationType as T
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
for name, ty, blocks in [("iq4_nl", T.IQ4_NL, nl), ("iq4_xs", T.IQ4_XS, xs)]:
    vals = quants.dequantize(blocks.reshape(-1), ty).astype(np.float32).reshape(-1)
    blocks.tofile(f"{out}/{name}.blocks")
    vals.astype("<f4").tofile(f"{out}/{name}.gguf_py.f32")
    print(name, blocks.shape, vals.shape, vals[:4])
