"""Length buckets (edgefed.batching): rows of like length share a batch, so batches pad less,
while every row stays as likely to be drawn and jobs without the setting draw as before."""
import numpy as np
import pytest

from edgefed.batching import check_buckets, row_batches
from edgefed.data import load_rotten_tomatoes
from edgefed.runtime import DeviceModel
from edgefed.trainer import LocalTrainer
from edgefed.zo import SeedPool, ZOConfig


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_one_bucket_draws_exactly_as_the_trainer_always_did():
    """Old jobs replay bit for bit: the same generator calls, in the same order."""
    old = np.random.default_rng(5)
    expected = [old.choice(100, size=8, replace=False) for _ in range(20)]
    got = _take(row_batches(np.random.default_rng(5), 100, 8, 1), 20)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_buckets_partition_a_uniform_draw_into_batches_of_like_length():
    lengths = np.random.default_rng(0).integers(5, 64, size=200)
    m, bs = 4, 8
    batches = _take(row_batches(np.random.default_rng(1), 200, bs, m, lambda i: int(lengths[i])), 4 * m)
    for k in range(0, len(batches), m):
        group = batches[k:k + m]
        rows = np.concatenate(group)
        assert len(set(rows.tolist())) == m * bs, "M batches hold M * batch distinct rows"
        by_batch = sorted(group, key=lambda b: lengths[b].min())
        for a, b in zip(by_batch, by_batch[1:]):
            assert lengths[a].max() <= lengths[b].min(), "batches do not interleave in length"
        # padding: each batch costs its longest row; sorting the same rows cannot cost more
        bucketed = sum(int(lengths[b].max()) for b in group)
        unsorted = sum(int(lengths[rows[i * bs:(i + 1) * bs]].max()) for i in range(m))
        assert bucketed <= unsorted
    mean_pad = np.mean([lengths[b].max() for b in batches])
    plain = np.mean([lengths[b].max() for b in _take(row_batches(np.random.default_rng(1), 200, bs, 1), 400)])
    assert mean_pad < 0.85 * plain, (mean_pad, plain)


def test_every_row_stays_equally_likely():
    lengths = np.arange(40)  # strongly ordered lengths: the case where a biased draw would show
    counts = np.zeros(40)
    for b in _take(row_batches(np.random.default_rng(2), 40, 4, 5, lambda i: int(lengths[i])), 5000):
        np.add.at(counts, b, 1)
    expected = 5000 * 4 / 40
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts


def test_the_order_of_the_batches_is_random_not_short_to_long():
    lengths = np.arange(64)
    firsts = [lengths[next(row_batches(np.random.default_rng(s), 64, 4, 8, lambda i: int(lengths[i])))].max()
              for s in range(40)]
    assert len(set(firsts)) > 4, "the first batch of a draw must not always be the shortest"


def test_too_few_rows_for_m_batches_falls_back_to_what_fits():
    got = _take(row_batches(np.random.default_rng(0), 10, 4, 8, lambda i: i), 6)
    assert all(len(b) == 4 and len(set(b.tolist())) == 4 for b in got)


@pytest.mark.parametrize("bad", [0, -2, 2.5, "eight", None])
def test_bad_bucket_settings_say_what_to_pass(bad):
    with pytest.raises(ValueError, match="length_buckets.*whole number >= 1"):
        check_buckets(bad)
    assert check_buckets("8") == 8 and check_buckets(4.0) == 4


def test_a_bucketed_job_is_refused_at_creation_with_a_bad_setting(tiny_artifacts):
    from edgefed.methods import JobConfig
    from edgefed.methods.fedkseed import check_job_bounds

    job = JobConfig(job="j", method="fedkseed", artifact=str(tiny_artifacts["lora"]), rounds=1,
                    devices_per_round=1, min_devices=1, round_timeout=10, local_steps=1, batch_size=4,
                    lr=1e-3, eps=1e-3, k=64, params={"length_buckets": 0})
    with pytest.raises(ValueError, match="length_buckets"):
        check_job_bounds(job, dense=False)


def test_the_trainer_pads_less_with_buckets_and_still_learns(tiny_artifacts):
    """On real review rows the trainer's batches are shorter with buckets, and training still
    lowers the training loss."""
    rows = list(load_rotten_tomatoes()[:200])
    padded = {}
    for m in (1, 8):
        model = DeviceModel(tiny_artifacts["lora"], threads=1, batch_size=8, seq_len=64, check_memory=False)
        seen = []
        encode = model.encode
        model.encode = lambda recs, _e=encode: seen.append(b := _e(recs)) or b
        cfg = ZOConfig(lr=1e-2, eps=1e-3, length_buckets=m)
        acc = LocalTrainer(model, SeedPool(1, 256), cfg, progress=False).train(rows, 24, batch_size=8, seed=3)
        train = [b for b in seen if b.input_ids.shape[0] == 8]
        assert len(train) == 24
        padded[m] = np.mean([b.input_ids.shape[1] for b in train])
        losses = [p.loss for p in acc.history]
        assert np.all(np.isfinite(losses))
    assert padded[8] < 0.85 * padded[1], padded


def test_dpo_pairs_have_a_length_without_a_reference_pass(tmp_path):
    pytest.importorskip("torch")
    from edgefed.data import PreferencePair
    from edgefed.export import export_artifact
    from edgefed.models import load_model, tiny_random_model

    model, tok = load_model(tiny_random_model(tmp_path / "m", seed=0))
    art = export_artifact(model, tmp_path / "dpo", "lora:r=2,targets=q_proj,v_proj", "dpo:beta=0.1",
                          tokenizer=tok, progress=False)
    dm = DeviceModel(art, threads=1, batch_size=2, seq_len=64, check_memory=False)
    dm.task.reference = lambda batch: pytest.fail("a length must not run the reference model")
    short = PreferencePair(prompt="Hi", chosen="yes", rejected="no")
    long = PreferencePair(prompt="Tell me about the film " * 3, chosen="a fine film indeed", rejected="bad")
    assert dm.row_length(short) < dm.row_length(long)


def test_each_rows_length_is_asked_for_once():
    """A length means tokenising the row: across draws, a row already measured is not measured again."""
    asked = []
    draws = row_batches(np.random.default_rng(4), 30, 4, 5, lambda i: asked.append(i) or i)
    _take(draws, 60)
    assert len(asked) == len(set(asked)) <= 30
