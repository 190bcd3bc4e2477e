"""Per-tensor sensitivity and the --target-bpw bit allocation.

Damage model. Quantizing weight W of a linear y = W x by dW perturbs its output by dy = dW x.
To second order the increase of KL(model || quantized) per token is 1/2 dy^T F dy, with F the
Fisher information of the next-token distribution with respect to y (the KL's gradient is zero
at dW = 0). Keeping F's diagonal and treating inputs and output sensitivities as independent:

    damage(W, b) = 1/2 * sum_j F_jj * sum_k dW_b[j, k]^2 * E[x_k^2]

F_jj = E[g_j^2], g = d log p(y) / d y with y *sampled from the model itself* (so E[g g^T] is
the true Fisher, not the empirical one), from one forward/backward pass of the transformers
model over part of the calibration batch. dW_b is the RTN error at b bits (clip searched).
The embedding's damage uses the gradient at each calibration position and the error of the
very row that position reads. Damages are in nats per token and add up across tensors.

Allocation. Each free tensor (not fixed by --keep) takes b in {2, 3, 4, 8} bits and a group
size in {32, 64, 128} (or the --group-size given); minimize the sum
of damages subject to sum of bits (codes + scales + zero points) <= target * weights, by a
Lagrangian relaxation (bisect lambda on damage + lambda * bits per tensor), then greedy
upgrades by best damage saved per bit until the budget is spent.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from llmpack.formats import quant
from llmpack.formats.errors import LlmpackError
from llmpack.runtime.progress import Progress

from ..arch import map_name
from ..source import apply_rewrite
from .options import kind_bits, tensor_bits

CANDIDATE_BITS = (2, 3, 4, 8)
CANDIDATE_GROUPS = (32, 64, 128)  # per tensor, unless --group-size was given
FISHER_TOKENS = 2048
SENS_GRID = (1.0, 0.9, 0.8, 0.7)  # a short clip grid is enough to rank tensors


def candidates(shape, opts) -> list[tuple[int, int]]:
    """(bits, group size) choices for one tensor."""
    groups = (opts.group_size,) if opts.group_explicit else CANDIDATE_GROUPS
    # 8 bits at groups of 128 costs 8.125 bits/weight instead of 8.5 at 32 for a negligible error
    # increase: the cheaper upgrade leaves budget for other tensors
    out = [(b, g) for b in CANDIDATE_BITS for g in groups if g <= shape[1]]
    return out or [(b, opts.group_size) for b in CANDIDATE_BITS]


def _split(types: dict, opts, hf_of: dict):
    free = [n for n, v in types.items() if opts.kept(n, hf_of.get(n)) is None]
    fixed = [n for n in types if n not in free]
    return free, fixed


def _fixed_bits(fixed, types, shapes, opts) -> int:
    return sum(kind_bits(types[n], shapes[n], opts) for n in fixed)


def check_budget(opts, types: dict, shapes: dict, hf_of: dict):
    """Refuse a target below what the smallest type (2 bits) allows for these tensors."""
    free, fixed = _split(types, opts, hf_of)
    numel = sum(shapes[n][0] * shapes[n][1] for n in types)
    least = _fixed_bits(fixed, types, shapes, opts) + sum(
        min(tensor_bits(b, shapes[n], g, opts.sym(b)) for b, g in candidates(shapes[n], opts)) for n in free)
    floor = least / max(numel, 1)
    if opts.target_bpw < floor - 1e-9:
        zp = "" if opts.sym(2) else " and zero points"
        gs = opts.group_size if opts.group_explicit else max(CANDIDATE_GROUPS)
        raise LlmpackError(f"--target-bpw {opts.target_bpw:g} is below {floor:.3f}, the least these tensors can take "
                           f"(2 bits, groups of up to {gs}{zp}); raise it")


def fisher_stats(ckpt, fam, ids: np.ndarray, seed: int = 0, max_tokens: int = FISHER_TOKENS, quiet: bool = False):
    """Run the transformers model forward/backward on calibration rows; return per HF weight name
    {"x2": E[x^2] (K,), "g2": E[g^2] (N,)} and the embedding's per-position (ids, g^2)."""
    import torch
    from transformers import AutoModelForCausalLM

    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(ckpt.dir), dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    stats, hooks = {}, []
    for mname, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.nn.Parameter) or w.dim() != 2 or isinstance(mod, torch.nn.Embedding):
            continue
        hf = f"{mname}.weight"
        try:
            canon, _ = map_name(fam, hf)
        except KeyError:
            continue
        if canon is None:
            continue
        st = stats.setdefault(hf, {"x2": 0.0, "g2": 0.0, "n": 0})

        def fwd(module, inputs, output, st=st):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            st["x2"] = st["x2"] + (x * x).sum(0).numpy()
            st["n"] += x.shape[0]

            def bwd(g, st=st):
                g = g.detach().reshape(-1, g.shape[-1]).double()
                st["g2"] = st["g2"] + (g * g).sum(0).numpy()
            output.register_hook(bwd)
        hooks.append(mod.register_forward_hook(fwd))
    emb_mod = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(seed)
    n_rows = max(1, min(len(ids), max_tokens // ids.shape[1]))
    emb_records = []
    progress = Progress("sensitivity (fisher)", n_rows, quiet=quiet)
    for r in range(n_rows):
        row = torch.as_tensor(ids[r][None])
        embeds = emb_mod(row).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        y = torch.multinomial(logp.detach().exp(), 1, generator=gen)[:, 0]
        (-logp[torch.arange(len(y)), y].sum()).backward()
        emb_records.append((ids[r].copy(), (embeds.grad[0].double() ** 2).numpy()))
        progress.step(f"row {r + 1}")
    progress.done()
    for h in hooks:
        h.remove()
    out = {}
    for hf, st in stats.items():
        if st["n"]:
            out[hf] = {"x2": np.asarray(st["x2"]) / st["n"], "g2": np.asarray(st["g2"]) / st["n"]}
    del model
    return out, emb_records


def _rtn_error(W, bits, g, opts, importance=None):
    parts = quant.quantize_rtn(W, bits, g, opts.sym(bits), importance=importance, grid=SENS_GRID)
    return quant.dequantize(parts, W.shape, bits, g) - W


def measure(ckpt, fam, source, shapes, free, ids, opts, model_desc, quiet=False) -> dict:
    """name -> {bits: damage} for every free tensor."""

    fisher, emb_records = fisher_stats(ckpt, fam, ids, opts.seed, quiet=quiet)
    # per canonical tensor: (x2 (K,), g2 (N,)) from the HF module statistics (fused qkv split in 3)
    canon_stats = {}
    tied_head = None
    for hf, st in fisher.items():
        canon, rewrite = map_name(fam, hf)
        if rewrite == "qkv":
            for x, g2 in zip("qkv", np.split(st["g2"], 3)):
                canon_stats[canon.replace("{q,k,v}", x)] = (st["x2"], g2)
        else:
            canon_stats[canon] = (st["x2"], st["g2"])
    if model_desc["tied_head"] and "head.weight" in canon_stats:
        tied_head = canon_stats.pop("head.weight")
    scale = model_desc["embed_scale"] or 1.0
    entries = [e for e in source.pre + [x for layer in source.layers for x in layer] + source.post]
    wanted = set(free)
    damages = {}
    # weighted by weights: Gemma-3-270M's embedding is 63 % of the work (counted as one tensor
    # of 127, the first ETA read 85 minutes for a 6-minute measurement)
    progress = Progress("sensitivity (damage)", sum(math.prod(shapes[n]) for n in wanted), quiet=quiet,
                        unit="M weights", scale=1e6)
    for hf, canon, rewrite in entries:
        names = [canon.replace("{q,k,v}", x) for x in "qkv"] if rewrite == "qkv" else [canon]
        if not wanted.intersection(names):
            continue
        for name, W in apply_rewrite(canon, ckpt.get(hf), rewrite):
            if name not in wanted:
                continue
            d = {}
            for b, g in candidates(W.shape, opts):
                if name == "embed.weight":
                    dW = _rtn_error(W, b, g, opts)
                    dmg = 0.0
                    n_pos = 0
                    for row_ids, g2 in emb_records:
                        dmg += float((g2 * (dW[row_ids] * scale) ** 2).sum())
                        n_pos += len(row_ids)
                    dmg = 0.5 * dmg / max(n_pos, 1)
                    if tied_head is not None:
                        x2, g2 = tied_head
                        dmg += 0.5 * float(g2 @ ((dW * dW) @ x2))
                elif name in canon_stats:
                    x2, g2 = canon_stats[name]
                    dW = _rtn_error(W, b, g, opts, importance=x2)
                    dmg = 0.5 * float(g2 @ ((dW * dW) @ x2))
                else:
                    dmg = 0.0
                d[(b, g)] = dmg
            damages[name] = d
            progress.step(name, n=math.prod(W.shape))
    progress.done()
    return damages


def solve(damages: dict, costs: dict, budget: float) -> dict:
    """Choose an option per tensor minimizing total damage with total cost <= budget.
    damages/costs: name -> {option: value}. Returns name -> option."""
    names = list(damages)
    opts = {n: sorted(damages[n], key=lambda b: costs[n][b]) for n in names}

    def pick(lam):
        return {n: min(opts[n], key=lambda b: damages[n][b] + lam * costs[n][b]) for n in names}

    def cost(choice):
        return sum(costs[n][b] for n, b in choice.items())

    lo, hi = 0.0, 1.0
    while cost(pick(hi)) > budget and hi < 1e30:
        hi *= 10
    choice = pick(hi)
    if cost(choice) > budget:
        choice = {n: opts[n][0] for n in names}
    for _ in range(100):
        mid = (lo + hi) / 2 if hi / max(lo, 1e-300) < 4 else np.sqrt(max(lo, hi * 1e-30) * hi)
        c = pick(mid)
        if cost(c) <= budget:
            hi, choice = mid, c
        else:
            lo = mid
    # greedy upgrades with what is left
    spent = cost(choice)
    while True:
        best = None
        for n in names:
            cur = choice[n]
            for b in opts[n]:
                dc = costs[n][b] - costs[n][cur]
                dd = damages[n][cur] - damages[n][b]
                if dc > 0 and dd > 0 and spent + dc <= budget and (best is None or dd / dc > best[0]):
                    best = (dd / dc, n, b, dc)
        if best is None:
            break
        _, n, b, dc = best
        choice[n] = b
        spent += dc
    return choice


SENSITIVITY_FORMAT = 1  # version of the --sensitivity file


def _cache_key(ckpt, opts, calib_info) -> dict:
    """What the damages depend on (everything but --target-bpw and --keep)."""
    return {"format": SENSITIVITY_FORMAT, "source": ckpt.sha256_files(), "calibration": calib_info,
            "seed": opts.seed, "symmetric": opts.symmetric, "group_size": opts.group_size,
            "group_explicit": opts.group_explicit, "bits": list(CANDIDATE_BITS), "grid": list(SENS_GRID),
            "fisher_tokens": FISHER_TOKENS}


def _read_cache(path, key, free):
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key or not set(free) <= set(data.get("damages", {})):
        return None
    return {n: {(int(b), int(g)): float(d) for b, g, d in data["damages"][n]} for n in free}


def _write_cache(path, key, damages):
    path = Path(path)
    body = {"key": key, "damages": {n: [[b, g, d] for (b, g), d in sorted(v.items())] for n, v in damages.items()}}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users, unlike the .llmpack
        os.replace(tmp, path)  # never a half-written file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def free_tensors(types: dict, opts, hf_of: dict) -> list:
    """The tensors the allocation chooses for (those not fixed by --keep)."""
    return _split(types, opts, hf_of)[0]


def measured_damages(ckpt, fam, source, model_desc, shapes, free, opts, ids, quiet=False, cache=None,
                     calib_info=None) -> tuple[dict, bool]:
    """name -> {(bits, group): damage} for the `free` tensors, and whether it came from `cache`
    (the --sensitivity FILE, read when it matches, else measured and written there)."""
    key = _cache_key(ckpt, opts, calib_info) if cache is not None else None
    damages = _read_cache(cache, key, free) if cache is not None else None
    if damages is not None:
        if not quiet:
            print(f"sensitivity: reused the measurement in {cache}", file=sys.stderr)
        return damages, True
    damages = measure(ckpt, fam, source, shapes, free, ids, opts, model_desc, quiet=quiet)
    if cache is not None:
        try:
            _write_cache(cache, key, damages)
        except OSError as e:
            raise LlmpackError(f"cannot write --sensitivity {cache}: {e.strerror}")
    return damages, False


def allocate(ckpt, fam, source, model_desc, shapes, types, hf_of, opts, ids, quiet=False,
             cache=None, calib_info=None) -> dict:
    """--target-bpw: measured damages -> per-tensor bits. Returns {"types": {...}, "summary": {...}}.

    `cache` (--sensitivity FILE): damages are read from FILE when it was measured for this
    checkpoint, calibration and options (so another --target-bpw costs no second measurement),
    else measured and written there."""
    free, fixed = _split(types, opts, hf_of)
    numel = sum(shapes[n][0] * shapes[n][1] for n in types)
    budget = opts.target_bpw * numel - _fixed_bits(fixed, types, shapes, opts)
    damages, reused = measured_damages(ckpt, fam, source, model_desc, shapes, free, opts, ids, quiet, cache,
                                       calib_info)
    costs = {n: {c: tensor_bits(c[0], shapes[n], c[1], opts.sym(c[0])) for c in damages[n]} for n in free}
    choice = solve(damages, costs, budget)
    spent = sum(costs[n][c] for n, c in choice.items()) + _fixed_bits(fixed, types, shapes, opts)
    counts = {}
    for n, (b, g) in choice.items():
        counts[f"q{b}g{g}"] = counts.get(f"q{b}g{g}", 0) + 1
    summary = {"target_bpw": opts.target_bpw, "bits_per_weight": round(spent / numel, 4), "tensors_per_type": counts,
               "predicted_kld": round(sum(damages[n][b] for n, b in choice.items()), 6),
               "method": "fisher-weighted RTN error, Lagrangian + greedy",
               "measurement": "reused" if reused else "measured"}
    return {"types": choice, "summary": summary, "damages": damages}
