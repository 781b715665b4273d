"""The model forward for the engine: a flat batch of tokens from many sequences, paged KV cache,
per-row LoRA, and results that do not depend on what else is in the batch.

Why not `model.generate`: continuous batching needs sequences to join and leave between steps, and
per-row adapters need each token routed to its own LoRA; peft splits a mixed batch per adapter in
every layer. The runner keeps the Hugging Face modules it can (embeddings, norms, rotary embedding,
activation, lm_head) and replaces attention and the projections.

Batch invariance. A row's result must not depend on the batch around it, or a seeded request would
give different tokens alone and under load. Two facts make that hold:
- Every matmul whose row count varies (projections, LoRA, attention) runs with at least
  a row count the BLAS treats like any larger one, padding with zeros. Some BLAS libraries switch
  kernels for small matrices (MKL's fp32 GEMM does for 1-3, 5-7 and 9-11 rows here);
  `probe_row_floor` measures the safe counts at start-up.
- Attention reduces over keys in fixed blocks of `block_size` with a sequential combination
  across blocks, so neither the padded length of the batch nor chunked prefill changes a sum.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from budwood.engine.adapters import AdapterError, LoadedAdapter
from budwood.errors import ModelError
from budwood.models.quant import is_quantized_linear, linear_shape

log = logging.getLogger(__name__)

_FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}


@dataclass
class StepItem:
    """One sequence's share of a step: compute `tokens` at positions start.., keep logits as asked."""
    blocks: list[int]
    start: int
    tokens: list[int]
    adapter: LoadedAdapter | None
    logits_from: int  # index into `tokens` of the first position whose logits are returned
    uid: int = -1  # the sequence's id, stable across steps (lets decoding reuse its gathered keys)


@dataclass
class LoraPlan:
    """A step's adapter routing: `gather` picks each adapter's rows (padded) from the step's tokens."""
    weights: dict  # {(layer, group): (A [n, S, in], B [n, out, S])}
    shape: tuple[int, int]  # (adapters, rows per adapter incl. padding)
    gather: torch.Tensor  # [n * rows] token indices; the last index is a zero row
    valid: torch.Tensor  # positions in n * rows that are real tokens, in `rows` order
    rows: torch.Tensor  # the step's token indices that use an adapter, adapter by adapter


@dataclass
class AttentionMeta:
    """Where one attention group's queries and keys are, for every layer of one step.

    A group is either all decoding sequences (one query each) or one prompt chunk. Shapes use R
    sequences, Qp query rows per sequence (padded to a safe matmul row count), Qm real query rows
    at most, and nb blocks of bs keys."""

    table: torch.Tensor  # [R, nb] cache block ids per sequence; unused slots point at the null block
    gather: torch.Tensor  # [R, Qp] index of each query row in the step's tokens; -1 for padding
    valid: torch.Tensor  # [R, Qm] bool: a real query row, not padding
    blocked: torch.Tensor  # [R, 1, Qm, nb*bs] bool: keys a query may not see (later, unused or padded)
    q_pad: int  # Qp
    q_max: int  # Qm
    n_blocks: int  # nb
    rows: torch.Tensor  # the step's token indices of this group's queries, in `valid` order
    decode: bool  # a decoding group: its gathered keys are kept for the next step (DecodeKV)
    reuse: bool  # decode only: last step's gathered keys hold these sequences; append instead of gathering
    pos: torch.Tensor  # [R] position of each sequence's first query token (decode: its only one)


@dataclass
class DecodeKV:
    """The decoding group's keys and values as gathered last step (fp32), per layer.

    Valid for the same sequences (`uids`) one token further on, while they fit in `n_blocks`."""

    uids: tuple[int, ...]
    n_blocks: int  # gathered per sequence, a little more than needed so a regather is rare
    starts: list[int] = field(default_factory=list)  # each sequence's position in the step that gathered
    k: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [K, R, nb*bs, D]
    v: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [K, R, nb, bs, D]


@dataclass
class QuantizedProjection:
    """Projections of one fused group whose weights are quantised (torchao int8, bitsandbytes nf4/int8): each
    module's own forward multiplies, dequantising as its library does (so the numbers are the model's own), and
    the outputs are concatenated as a fused weight's would be. `shape` is the fused (out, in), as a weight's."""

    modules: list[torch.nn.Module]
    shape: tuple[int, int]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.modules) == 1:
            return self.modules[0](x)
        return torch.cat([m(x) for m in self.modules], dim=-1)


@dataclass(frozen=True)
class RowFloor:
    """Row counts at which a matmul gives each row the same bits as any larger matmul does."""
    good: tuple[int, ...]  # safe counts up to and including `floor`
    floor: int  # every count from here on is safe
    upcast: bool = False  # no count is safe in this dtype: multiply in float32 (at these counts) instead

    def pad(self, m: int) -> int:
        return m if m >= self.floor else next(g for g in self.good if g >= m)


def probe_row_floor(dtype: torch.dtype, device: torch.device, widths: list[tuple[int, int]]) -> RowFloor:
    """Measure which row counts are batch-invariant for this BLAS, dtype and device (MKL's fp32 GEMM:
    4, 8 and from 12 on, on the machines we measured)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    counts = list(range(1, 41)) + [48, 64, 97, 128]
    ok = dict.fromkeys(counts, True)
    for k, n in widths:
        w = torch.randn(n, k, generator=gen).to(dtype=dtype, device=device)
        x = torch.randn(160, k, generator=gen).to(dtype=dtype, device=device)
        ref = x @ w.T
        for m in counts:
            ok[m] = ok[m] and torch.equal(x[:m] @ w.T, ref[:m])
    floor = next((c for i, c in enumerate(counts) if all(ok[m] for m in counts[i:])), None)
    if floor is None:
        if dtype == torch.float32:
            log.warning("no row count makes float32 matmuls batch-invariant on %s: seeded outputs may vary "
                        "with load", device)
            return RowFloor((128,), 128)
        # e.g. bf16 on CPUs with AMX: the kernel's blocking follows the row count, so no count is safe
        log.warning("no row count makes %s matmuls batch-invariant on %s: multiplying in float32 instead "
                    "(slower; EngineConfig.batch_invariant=False trades this away)", dtype, device)
        f32 = probe_row_floor(torch.float32, device, widths)
        return RowFloor(f32.good, f32.floor, upcast=True)
    return RowFloor(tuple(m for m in counts if m <= floor and ok[m]), floor)


class Runner:
    def __init__(self, model: torch.nn.Module, *, block_size: int = 64, num_blocks: int = 512,
                 batch_invariant: bool = True, max_lora_rank: int = 16):
        cfg = model.config
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None or not hasattr(inner, "rotary_emb"):
            raise ModelError(f"{type(model).__name__}: the engine serves Llama-family decoders "
                             "(Llama, Mistral, Qwen2/3, SmolLM); use --engine vllm for others")
        first = layers[0]
        for attr in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(first.self_attn, attr):
                raise ModelError(f"{type(model).__name__}: attention has no {attr}; not a Llama-family layer")
        for attr in ("gate_proj", "up_proj", "down_proj"):
            if not hasattr(first.mlp, attr):
                raise ModelError(f"{type(model).__name__}: MLP has no {attr}; not a Llama-family layer")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.lm_head = model.lm_head
        # a quantised head (none by default: transformers keeps the output embedding in float) runs its own forward
        self.head = (QuantizedProjection([self.lm_head], linear_shape(self.lm_head))
                     if is_quantized_linear(self.lm_head) else self.lm_head.weight)
        self.layers = layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.group = self.num_heads // self.num_kv
        self.vocab_size = linear_shape(self.lm_head)[0]
        self.max_model_len = int(getattr(cfg, "max_position_embeddings", 4096))
        self.block_size = block_size
        self.max_lora_rank = max_lora_rank
        self._decode_kv: DecodeKV | None = None
        self._stacks: OrderedDict[tuple, dict] = OrderedDict()
        self.act = first.mlp.act_fn
        self.shapes = {name: linear_shape(getattr(first.self_attn if name.endswith(("q_proj", "k_proj", "v_proj",
                                                                                    "o_proj")) else first.mlp, name))
                       for names in _FUSED.values() for name in names}
        self.fused = [self._fuse(layer) for layer in layers]
        # [kv head, block, position in block, head dim]: gathered blocks are ready for batched matmuls
        self.k_cache = [torch.zeros(self.num_kv, num_blocks, block_size, self.head_dim, dtype=self.dtype,
                                    device=self.device) for _ in layers]
        self.v_cache = [torch.zeros_like(k) for k in self.k_cache]
        self.num_blocks = num_blocks
        hidden = cfg.hidden_size
        widths = [(hidden, self.fused[0]["qkv"][0].shape[0]), (self.shapes["down_proj"][1], hidden)]
        free = RowFloor((1,), 1)
        self.rows = probe_row_floor(self.dtype, self.device, widths) if batch_invariant else free
        self.rows_f32 = (probe_row_floor(torch.float32, self.device, [(self.head_dim, block_size),
                                                                       (block_size, self.head_dim)])
                         if batch_invariant else free)
        log.info("engine: %d layers, %s, batch-invariant row counts %s (fp32: %s)",
                 len(layers), self.dtype, self.rows, self.rows_f32)

    def _fuse(self, layer) -> dict[str, tuple[torch.Tensor | QuantizedProjection, torch.Tensor | None,
                                              list[tuple[str, int, int]]]]:
        """Concatenate q/k/v and gate/up so each layer runs four projections, not seven. Quantised weights are
        not concatenated (nor dequantised into a float copy, which would undo their saving): their modules run
        one after another (QuantizedProjection), biases included."""
        out = {}
        for group, names in _FUSED.items():
            mods = [getattr(layer.self_attn if group in ("qkv", "o") else layer.mlp, n) for n in names]
            shapes = [linear_shape(m) for m in mods]
            slices, at = [], 0
            for n, (rows, _) in zip(names, shapes):
                slices.append((n, at, at + rows))
                at += rows
            if any(is_quantized_linear(m) for m in mods):
                out[group] = (QuantizedProjection(mods, (at, shapes[0][1])), None, slices)
                continue
            w = torch.cat([m.weight.detach() for m in mods]) if len(mods) > 1 else mods[0].weight.detach()
            biases = [m.bias for m in mods]
            b = (torch.cat([bb.detach() if bb is not None else torch.zeros(m.weight.shape[0], dtype=w.dtype,
                                                                           device=w.device)
                            for bb, m in zip(biases, mods)]) if any(bb is not None for bb in biases) else None)
            out[group] = (w, b, slices)
        return out

    # -- matmuls with a floor on rows -------------------------------------------------------------
    def _mm(self, x: torch.Tensor, w: torch.Tensor | QuantizedProjection, rows: RowFloor) -> torch.Tensor:
        """x @ w.T computed on a safe row count (zero rows added), so each row gets the same kernel. A quantised
        projection multiplies through its modules on the same padded rows (torchao's int8 forward is a float
        matmul by the int8 values, then a per-column scale, so the same row counts are safe)."""
        n = x.shape[0]
        m = rows.pad(n)
        quantized = isinstance(w, QuantizedProjection)
        if rows.upcast:  # a quantised module computes in its input's dtype: a float32 input upcasts it too
            dtype, x = x.dtype, x.float()
            return self._mm(x, w if quantized else w.float(), RowFloor(rows.good, rows.floor)).to(dtype)
        if m > n:
            x = torch.cat([x, x.new_zeros(m - n, x.shape[1])])
        y = w(x) if quantized else x @ w.T
        return y[:n] if m > n else y

    def _project(self, li: int, group: str, x: torch.Tensor, lora: list[LoraPlan]) -> torch.Tensor:
        w, b, _ = self.fused[li][group]
        y = self._mm(x, w, self.rows)
        if b is not None:
            y = y + b
        if lora:
            x0 = torch.cat([x, x.new_zeros(1, x.shape[1])])
        for plan in lora:  # adapters with similar row counts in two batched matmuls, fp32 as peft computes
            pair = plan.weights.get((li, group))
            if pair is None:
                continue
            a, bmat = pair
            n, p = plan.shape
            xs = x0.index_select(0, plan.gather).view(n, p, -1).float()
            delta = ((xs @ a.transpose(1, 2)) @ bmat.transpose(1, 2)).view(n * p, -1).index_select(0, plan.valid)
            y.index_copy_(0, plan.rows, (y.index_select(0, plan.rows).float() + delta).to(y.dtype))
        return y

    def _lora_plan(self, items: list[StepItem], offsets: list[int]) -> list[LoraPlan]:
        """Which rows use which adapter this step, as gather indices into [adapters, rows, features];
        adapters are grouped by row count so one long prompt chunk does not pad every adapter's rows."""
        by_adapter: dict[str, tuple[LoadedAdapter, list[int]]] = {}
        for off, it in zip(offsets, items):
            if it.adapter is not None:
                by_adapter.setdefault(it.adapter.key, (it.adapter, []))[1].extend(range(off, off + len(it.tokens)))
        groups: list[list[tuple[LoadedAdapter, list[int]]]] = []
        for entry in sorted(by_adapter.values(), key=lambda e: (-len(e[1]), e[0].key)):
            if groups and 2 * len(entry[1]) >= len(groups[-1][0][1]):
                groups[-1].append(entry)
            else:
                groups.append([entry])
        total = offsets[-1] + len(items[-1].tokens)
        plans = []
        for adapters in groups:
            adapters.sort(key=lambda e: e[0].key)
            p = self.rows_f32.pad(max(len(r) for _, r in adapters))
            gather = torch.full((len(adapters), p), total, dtype=torch.long)
            valid = []
            for i, (_, rows) in enumerate(adapters):
                gather[i, :len(rows)] = torch.tensor(rows)
                valid.extend(range(i * p, i * p + len(rows)))
            rows = torch.tensor([r for _, rs in adapters for r in rs], device=self.device)
            plans.append(LoraPlan(self._stacked([a for a, _ in adapters]), (len(adapters), p),
                                  gather.view(-1).to(self.device), torch.tensor(valid, device=self.device), rows))
        return plans

    def _stacked(self, adapters: list[LoadedAdapter]) -> dict:
        """{(layer, group): (A [n, S, in], B [n, out, S])} for these adapters, kept for recent combinations.

        Every adapter is padded to the same slots (max_lora_rank per target), so its matmul shapes, and
        so its numbers, never depend on which other adapters share the batch."""
        key = tuple(a.key for a in adapters)
        hit = self._stacks.get(key)
        if hit is None:
            packed = [self.pack_adapter(a) for a in adapters]
            hit = {}
            for k in packed[0]:
                if all(pk[k] is None for pk in packed):
                    continue
                parts = [pk[k] if pk[k] is not None else self._zero_pack(k) for pk in packed]
                hit[k] = (torch.stack([a for a, _ in parts]), torch.stack([b for _, b in parts]))
            self._stacks[key] = hit
            while len(self._stacks) > 16:
                self._stacks.pop(next(iter(self._stacks)))
        return hit

    def _zero_pack(self, k: tuple[int, str]) -> tuple[torch.Tensor, torch.Tensor]:
        w, _, slices = self.fused[k[0]][k[1]]
        slots = len(slices) * self.max_lora_rank
        return (torch.zeros(slots, w.shape[1], device=self.device), torch.zeros(w.shape[0], slots, device=self.device))

    def pack_adapter(self, adapter: LoadedAdapter) -> dict:
        """Per (layer, group): A [targets*R, in] and block-diagonal B*scale [out, targets*R], or None."""
        if adapter.packed:
            return adapter.packed
        if adapter.rank > self.max_lora_rank:
            raise AdapterError(f"adapter {adapter.name!r} has rank {adapter.rank}; the engine was started with "
                               f"max_lora_rank {self.max_lora_rank} (raise it to serve this adapter)")
        R = self.max_lora_rank
        out = {}
        for li in range(len(self.layers)):
            for group in _FUSED:
                w, _, slices = self.fused[li][group]
                mods = [adapter.modules.get((li, name)) for name, _, _ in slices]
                if all(m is None for m in mods):
                    out[(li, group)] = None
                    continue
                a, bmat = self._zero_pack((li, group))
                for t, (m, (_, lo, hi)) in enumerate(zip(mods, slices)):
                    if m is not None:
                        r = m.A.shape[0]
                        a[t * R:t * R + r] = m.A
                        bmat[lo:hi, t * R:t * R + r] = m.B * m.scale
                out[(li, group)] = (a, bmat)
        adapter.packed = out
        return out

    # -- the forward ------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, items: list[StepItem]) -> torch.Tensor:
        """fp32 logits for each item's positions from `logits_from` on, concatenated in item order."""
        dev, bs = self.device, self.block_size
        tokens = torch.tensor([t for it in items for t in it.tokens], device=dev)
        positions = torch.tensor([it.start + i for it in items for i in range(len(it.tokens))], device=dev)
        slots = torch.tensor([it.blocks[p // bs] * bs + p % bs for it in items
                              for p in range(it.start, it.start + len(it.tokens))], device=dev)
        # decoding rows attend together; each prompt chunk alone, so one long chunk does not pad the
        # query rows of every decoding sequence to its length
        offsets = _offsets(items)
        decoding = [i for i, it in enumerate(items) if len(it.tokens) == 1]
        groups = ([decoding] if decoding else []) + [[i] for i, it in enumerate(items) if len(it.tokens) > 1]
        metas = [self._attention_meta([items[i] for i in g], [offsets[i] for i in g], decode=g is decoding)
                 for g in groups]
        lora = self._lora_plan(items, offsets)
        x = self.embed(tokens)
        cos, sin = self.rotary(x, positions[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]
        T, H, K, D = x.shape[0], self.num_heads, self.num_kv, self.head_dim
        for li, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            qkv = self._project(li, "qkv", h, lora)
            q = qkv[:, :H * D].view(T, H, D)
            k = qkv[:, H * D:(H + K) * D].view(T, K, D)
            v = qkv[:, (H + K) * D:].view(T, K, D)
            attn = layer.self_attn
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k_cache[li].view(K, -1, D).index_copy_(1, slots, k.to(self.dtype).transpose(0, 1))
            self.v_cache[li].view(K, -1, D).index_copy_(1, slots, v.to(self.dtype).transpose(0, 1))
            o = q.new_empty(T, H * D, dtype=torch.float32)
            for meta in metas:
                o[meta.rows] = self._attention(li, q, k, v, meta)
            x = x + self._project(li, "o", o.to(x.dtype), lora)
            h = layer.post_attention_layernorm(x)
            gu = self._project(li, "gate_up", h, lora)
            inter = gu.shape[1] // 2
            x = x + self._project(li, "down", self.act(gu[:, :inter]) * gu[:, inter:], lora)
        keep = torch.tensor([i for off, it in zip(offsets, items)
                             for i in range(off + it.logits_from, off + len(it.tokens))], dtype=torch.long, device=dev)
        if not len(keep):  # only prompt chunks that end mid-prompt: no logits wanted
            return torch.empty(0, self.vocab_size, device=dev)
        h = self.norm(x.index_select(0, keep))
        return self._mm(h, self.head, self.rows).float()

    def _attention_meta(self, items: list[StepItem], offsets: list[int], decode: bool = False) -> AttentionMeta:
        """Block tables, query placement and the causal mask for one attention group of a step."""
        bs, dev = self.block_size, self.device
        n_q = max(len(it.tokens) for it in items)
        reuse = False
        if decode:  # the same sequences as last step, one token further: append to the gathered keys
            uids = tuple(it.uid for it in items)
            dc = self._decode_kv
            starts = [it.start for it in items]
            reuse = (dc is not None and dc.uids == uids and dc.starts == [s - 1 for s in starts]
                     and max(starts) < dc.n_blocks * bs)
            if not reuse:
                n_blocks = max(-(-(it.start + 1) // bs) for it in items) + 2  # room to grow before a regather
                self._decode_kv = dc = DecodeKV(uids, n_blocks)
            dc.starts = starts
            n_blocks = dc.n_blocks
        else:
            n_blocks = max(-(-(it.start + len(it.tokens)) // bs) for it in items)
        q_pad = n_q  # the fewest query rows whose grouped-head count is a safe matmul row count
        while self.rows_f32.pad(self.group * q_pad) != self.group * q_pad:
            q_pad += 1
        table = torch.zeros(len(items), n_blocks, dtype=torch.long, device=dev)
        qpos = torch.full((len(items), q_pad), -1, dtype=torch.long, device=dev)
        gather = torch.full((len(items), q_pad), -1, dtype=torch.long, device=dev)
        for r, (off, it) in enumerate(zip(offsets, items)):
            # decoding gathers its reserved blocks ahead too, so later tokens land where it looks
            used = min(len(it.blocks), n_blocks) if decode else -(-(it.start + len(it.tokens)) // bs)
            table[r, :used] = torch.tensor(it.blocks[:used], device=dev)
            qpos[r, :len(it.tokens)] = torch.arange(it.start, it.start + len(it.tokens), device=dev)
            gather[r, :len(it.tokens)] = torch.arange(off, off + len(it.tokens), device=dev)
        keys = torch.arange(n_blocks * bs, device=dev)
        allowed = keys[None, None, :] <= qpos[:, :n_q, None]  # causal; also hides unused and padded keys
        blocked = ~allowed.view(len(items), 1, n_q, n_blocks * bs)
        rows = torch.tensor([off + i for off, it in zip(offsets, items) for i in range(len(it.tokens))], device=dev)
        return AttentionMeta(table=table, gather=gather, valid=gather[:, :n_q] >= 0, blocked=blocked, q_pad=q_pad,
                             q_max=n_q, n_blocks=n_blocks, rows=rows, decode=decode, reuse=reuse,
                             pos=torch.tensor([it.start for it in items], device=dev))

    def _gathered_kv(self, li: int, k: torch.Tensor, v: torch.Tensor,
                     meta: AttentionMeta) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys [K, R, nb*bs, D] and values [K, R, nb, bs, D] in fp32 for this group's sequences.

        Decoding keeps last step's gathered copy and appends the new token to it: the same numbers
        as a fresh gather from the pool (which holds the same tokens), without copying every key again."""
        K, D, R, nb, bs = self.num_kv, self.head_dim, meta.table.shape[0], meta.n_blocks, self.block_size
        dc = self._decode_kv if meta.decode else None
        if dc is not None and meta.reuse:
            kc, vc = dc.k[li], dc.v[li]
            r = torch.arange(R, device=self.device)
            kc[:, r, meta.pos] = k[meta.rows].to(self.dtype).float().transpose(0, 1)
            vc.view(K, R, nb * bs, D)[:, r, meta.pos] = v[meta.rows].to(self.dtype).float().transpose(0, 1)
            return kc, vc
        blocks = meta.table.view(-1)  # index_select is many times faster than advanced indexing here
        kc = self.k_cache[li].index_select(1, blocks).float().view(K, R, nb * bs, D)
        vc = self.v_cache[li].index_select(1, blocks).float().view(K, R, nb, bs, D)
        if dc is not None:
            dc.k[li], dc.v[li] = kc, vc
        return kc, vc

    def _attention(self, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   meta: AttentionMeta) -> torch.Tensor:
        """Softmax attention over each sequence's cached keys, summed over values in fixed blocks.

        Shapes: K kv heads, R sequences, G query heads per kv head, Q query rows per sequence (Qp
        padded to the matmul row floor, Qm real at most), nb blocks of bs keys. Scores are dot
        products over the head dimension, so one matmul over all keys is batch-invariant; sums over
        keys (softmax denominator, values) run per block of bs and are then combined in block order,
        so the number of padded blocks never changes a sum."""
        R, Qp, Qm, nb = meta.table.shape[0], meta.q_pad, meta.q_max, meta.n_blocks
        K, G, D, bs = self.num_kv, self.group, self.head_dim, self.block_size
        qf = torch.cat([q.float() * D ** -0.5, q.new_zeros(1, q.shape[1], D, dtype=torch.float32)])
        qp = qf[meta.gather]  # [R, Qp, H, D]; -1 picks the zero row
        qp = qp.view(R, Qp, K, G, D).permute(2, 0, 3, 1, 4).reshape(K, R, G * Qp, D)
        kc, vc = self._gathered_kv(li, k, v, meta)
        s = (qp @ kc.transpose(-1, -2)).view(K, R, G, Qp, nb * bs)[:, :, :, :Qm]
        s = s.masked_fill(meta.blocked, float("-inf")).view(K, R, G * Qm, nb, bs)
        m = s.amax(-1)  # per block: [K, R, GQm, nb]
        p = torch.exp(s - torch.where(torch.isinf(m), 0.0, m)[..., None])
        lsum = p.sum(-1)
        p = p.transpose(2, 3)  # [K, R, nb, GQm, bs]
        if self.rows_f32.pad(G * Qm) > G * Qm:
            p = torch.cat([p, p.new_zeros(K, R, nb, self.rows_f32.pad(G * Qm) - G * Qm, bs)], dim=3)
        o = (p @ vc)[:, :, :, :G * Qm]  # [K, R, nb, GQm, D]
        top = m.amax(-1, keepdim=True)
        w = torch.exp(m - torch.where(torch.isinf(top), 0.0, top))  # [K, R, GQm, nb]
        num = (w.transpose(2, 3)[..., None] * o).cumsum(2)[:, :, -1]  # in block order; padding adds exact 0
        den = (w * lsum).cumsum(-1)[..., -1].clamp_min(1e-30)
        out = (num / den[..., None]).view(K, R, G, Qm, D).permute(1, 3, 0, 2, 4).reshape(R, Qm, K * G * D)
        return out[meta.valid]


def _offsets(items: list[StepItem]) -> list[int]:
    out, at = [], 0
    for it in items:
        out.append(at)
        at += len(it.tokens)
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
