#!/usr/bin/env python3
"""Writes a small GGUF cut from a real one, for checking one backend against another.

Keeps the first LAYERS blocks, cuts token_embd.weight to its first VOCAB rows and drops
output.weight (the head is then tied to the embeddings). The result computes the same function on
every backend with real weight statistics (random weights, as in synth_gguf.rs, amplify rounding
differences through many layers), and is small enough to carry to a machine without internet:

    python3 models/trim_gguf.py "$(python3 models/fetch.py 0.5b)" /tmp/real2.gguf 2 16384  # 38 MB

Its tokenizer is the original one, so only texts whose token ids are below VOCAB can be fed to it
(benches/data/fidelity_small.txt is such a text for VOCAB=16384).
"""
import struct, sys
if len(sys.argv) != 5:
    sys.exit("usage: trim_gguf.py IN.gguf OUT.gguf LAYERS VOCAB")
src, dst, LAYERS, VOCAB = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
b = open(src, 'rb').read()
magic, ver, n_t, n_kv = struct.unpack_from('<4sIQQ', b, 0)
if magic != b'GGUF':
    sys.exit(f'{src} is not a GGUF file')
o = 24
SIZES = {0:1,1:1,2:2,3:2,4:4,5:4,6:4,7:1,10:8,11:8,12:8}
def skip_val(t, o):
    if t in SIZES: return o + SIZES[t]
    if t == 8:
        (n,) = struct.unpack_from('<Q', b, o); return o + 8 + n
    if t == 9:
        et, n = struct.unpack_from('<IQ', b, o); o += 12
        if et in SIZES: return o + SIZES[et]*n
        for _ in range(n): o = skip_val(et, o)
        return o
    raise ValueError(t)
kvs = []
align = 32
for _ in range(n_kv):
    s0 = o
    (kl,) = struct.unpack_from('<Q', b, o); key = b[o+8:o+8+kl].decode(); o += 8 + kl
    (t,) = struct.unpack_from('<I', b, o); o += 4
    v0 = o; o = skip_val(t, o)
    raw = b[s0:o]
    if key == 'qwen2.block_count':
        raw = b[s0:v0] + struct.pack('<I', LAYERS)
    if key == 'general.alignment':
        align = struct.unpack_from('<I', b, v0)[0]
    kvs.append(raw)
# tensor infos
BLOCK = {0:(1,4),1:(1,2),2:(32,18),3:(32,20),6:(32,22),7:(32,24),8:(32,34),10:(256,84),11:(256,110),12:(256,144),13:(256,176),14:(256,210),30:(1,2)}
infos = []
for _ in range(n_t):
    (nl,) = struct.unpack_from('<Q', b, o); name = b[o+8:o+8+nl].decode(); o += 8 + nl
    (nd,) = struct.unpack_from('<I', b, o); o += 4
    dims = list(struct.unpack_from('<%dQ' % nd, b, o)); o += 8 * nd
    ty, off = struct.unpack_from('<IQ', b, o); o += 12
    infos.append((name, dims, ty, off))
data0 = (o + align - 1) // align * align
out = []
for name, dims, ty, off in infos:
    if name.startswith('blk.') and int(name.split('.')[1]) >= LAYERS: continue
    if name == 'output.weight': continue
    if ty not in BLOCK:
        sys.exit(f'tensor {name}: GGML type {ty} is not handled by this script')
    bs, bb = BLOCK[ty]
    row = dims[0] // bs * bb
    rows = 1
    for d in dims[1:]: rows *= d
    if name == 'token_embd.weight':
        dims = [dims[0], VOCAB]; rows = VOCAB
    out.append((name, dims, ty, b[data0+off:data0+off+row*rows]))
with open(dst, 'wb') as f:
    f.write(struct.pack('<4sIQQ', b'GGUF', ver, len(out), n_kv))
    for raw in kvs: f.write(raw)
    off = 0; offs = []
    for name, dims, ty, d in out:
        offs.append(off); off = (off + len(d) + align - 1) // align * align
    for (name, dims, ty, d), to in zip(out, offs):
        nb = name.encode(); f.write(struct.pack('<Q', len(nb)) + nb + struct.pack('<I', len(dims)) + struct.pack('<%dQ' % len(dims), *dims) + struct.pack('<IQ', ty, to))
    pos = f.tell(); f.write(b'\0' * ((-pos) % align))
    for (name, dims, ty, d), to in zip(out, offs):
        f.write(d); f.write(b'\0' * ((-len(d)) % align))
print(dst, len(out), 'tensors')
