"""Measured dispatch (runtime/optim/dispatch.py, shape_probe.py): the choice follows what the timer
reports, the cache is keyed per machine (CPU model, flags, threads, torch version, kernel sources) and
skips timing on a hit, a corrupt file or an unwritable folder warns and still works, and the report
lists the times and the choice. Every timer here is fake: nothing asserts on a real timing."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import runtime
from runtime import optim
from runtime.kernels import cpu_features
from runtime.models.errors import OptimizationError
from runtime.optim import dispatch, dispatch_cache
from runtime.optim.dispatch import Candidate, DispatchCache, OpKey, fixed_timer, measure
from runtime.optim.shape_probe import probe_calls
from pipeline_fixtures import pipeline_state, assert_same_state, quiet_pipeline

KEY = OpKey("conv3x3", ((2, 64, 32, 32), (64, 64, True), False), "bfloat16")


def never_run():
    raise AssertionError("a fake timer must not run the candidate")


CANDIDATES = [Candidate("direct", never_run, baseline=True), Candidate("winograd", never_run),
              Candidate("other", never_run)]


@pytest.fixture
def cache(tmp_path):
    return DispatchCache(tmp_path / "dispatch")


@pytest.fixture(scope="module")
def pipe(sd_folder, one_thread):
    return quiet_pipeline(runtime.StableDiffusionPipeline, sd_folder)


@pytest.mark.parametrize("winner", ["direct", "winograd", "other"])
def test_the_choice_is_the_candidate_the_timer_reports_fastest(cache, winner):
    times = {c.name: (1.0 if c.name == winner else 2.0) for c in CANDIDATES}
    timer = fixed_timer(times)
    m = measure(KEY, CANDIDATES, timer=timer, cache=cache)
    assert m.choice == winner and m.source == "measured" and m.times == times and m.baseline == "direct"
    assert timer.calls == [("direct", "winograd", "other")]
    assert f"-> {winner} (measured)" in m.summary() and "1e+03 ms" in m.summary()


def test_a_candidate_must_beat_the_eager_one_by_the_margin(cache):
    with dispatch.using(margin=0.05):
        assert measure(KEY, CANDIDATES, timer=fixed_timer({"direct": 1.0, "winograd": 0.97}), cache=cache).choice \
            == "direct"
    assert dispatch.pick({"direct": 1.0, "winograd": 0.9}, "direct", 0.05) == "winograd"
    assert dispatch.pick({"direct": math.inf, "winograd": 0.9}, "direct", 0.05) == "winograd"  # eager failed
    assert dispatch.pick({"direct": 1.0, "winograd": math.inf}, "direct", 0.05) == "direct"


def test_one_candidate_is_not_timed(cache):
    timer = fixed_timer({})
    m = measure(KEY, CANDIDATES[:1], timer=timer, cache=cache, note="winograd: no kernel here")
    assert m.choice == "direct" and m.source == "only candidate" and timer.calls == []
    assert "winograd: no kernel here" in m.summary()


def test_a_cache_hit_skips_timing_also_in_another_process(cache):
    measure(KEY, CANDIDATES, timer=fixed_timer({"direct": 2.0, "winograd": 1.0, "other": 3.0}), cache=cache)
    again = fixed_timer({"direct": 1.0})
    m = measure(KEY, CANDIDATES, timer=again, cache=cache)
    assert again.calls == [] and m.source == "cached" and m.choice == "winograd" and m.times["winograd"] == 1.0
    fresh = DispatchCache(cache.directory)  # what a new process sees: the file alone
    assert measure(KEY, CANDIDATES, timer=again, cache=fresh).source == "cached" and again.calls == []
    # another set of candidates (prepack ran, say) is another entry, measured anew
    other = [Candidate("prepacked", never_run, baseline=True), Candidate("winograd", never_run)]
    assert measure(KEY, other, timer=again, cache=fresh).source == "measured" and again.calls


def test_the_cache_file_names_the_machine_and_is_written_atomically(cache):
    measure(KEY, CANDIDATES, timer=fixed_timer({"direct": 2.0, "winograd": 1.0, "other": 3.0}), cache=cache)
    files = list(cache.directory.iterdir())
    assert [f.name for f in files] == [DispatchCache.file_name(dispatch.machine_key())]  # no temporary left
    data = json.loads(files[0].read_text())
    machine = data["machine"]
    assert machine["cpu"] == cpu_features.model_name() and machine["flags"] == cpu_features.current().describe()
    assert machine["threads"] == torch.get_num_threads() and machine["torch"] == torch.__version__
    assert machine["kernels"] == dispatch.kernel_sources_hash()
    (entry,) = data["entries"].values()
    assert entry == {"times": {"direct": 2.0, "winograd": 1.0, "other": 3.0}, "choice": "winograd"}


def test_choices_are_kept_per_machine(cache, fake_cpu, monkeypatch):
    first = fixed_timer({"direct": 2.0, "winograd": 1.0, "other": 3.0})
    fake_cpu("avx512", "avx512_bf16")
    assert measure(KEY, CANDIDATES, timer=first, cache=cache).choice == "winograd"
    seen = {f.name for f in cache.directory.iterdir()}

    def measured_anew(winner: str) -> None:
        timer = fixed_timer({"direct": 2.0, winner: 1.0, "winograd" if winner == "other" else "other": 3.0})
        m = measure(KEY, CANDIDATES, timer=timer, cache=cache)
        assert timer.calls and m.source == "measured" and m.choice == winner
        new = {f.name for f in cache.directory.iterdir()} - seen
        assert len(new) == 1  # a file of its own: machines sharing a home folder never mix
        seen.update(new)

    fake_cpu("avx512", "avx512_bf16", "amx")  # a Xeon with AMX tiles decides by its own measurement
    measured_anew("other")
    fake_cpu("avx512")
    measured_anew("winograd")
    monkeypatch.setattr(cpu_features, "model_name", lambda: "Another CPU")  # same flags, another model
    measured_anew("other")
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)  # another thread count
    try:
        measured_anew("winograd")
    finally:
        torch.set_num_threads(before)
    fake_cpu("avx512", "avx512_bf16", "amx")  # back to the AMX machine: its own choice, from the cache
    monkeypatch.undo()
    hit = fixed_timer({})
    assert measure(KEY, CANDIDATES, timer=hit, cache=cache).choice == "other" and hit.calls == []


def test_the_flags_environment_variable_is_part_of_the_key(cache, monkeypatch):
    if not cpu_features.host().x86_64:
        pytest.skip("not x86-64: no flags to take away")
    monkeypatch.setenv(cpu_features.ENV, "none")
    measure(KEY, CANDIDATES, timer=fixed_timer({"direct": 1.0, "winograd": 2.0}), cache=cache)
    monkeypatch.delenv(cpu_features.ENV)
    timer = fixed_timer({"direct": 2.0, "winograd": 1.0})
    assert measure(KEY, CANDIDATES, timer=timer, cache=cache).choice == "winograd" and timer.calls


def test_a_torch_upgrade_measures_again(cache, monkeypatch):
    measure(KEY, CANDIDATES, timer=fixed_timer({"direct": 1.0, "winograd": 2.0}), cache=cache)
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".next")
    timer = fixed_timer({"direct": 2.0, "winograd": 1.0})
    m = measure(KEY, CANDIDATES, timer=timer, cache=cache)
    assert timer.calls and m.source == "measured" and m.choice == "winograd"
    monkeypatch.undo()  # the old version's choice is still its own
    assert measure(KEY, CANDIDATES, timer=fixed_timer({}), cache=DispatchCache(cache.directory)).choice == "direct"


def test_an_edited_kernel_measures_again(cache, monkeypatch):
    measure(KEY, CANDIDATES, timer=fixed_timer({"direct": 1.0, "winograd": 2.0}), cache=cache)
    monkeypatch.setattr(dispatch_cache, "_kernel_hash", ["edited"])
    timer = fixed_timer({"direct": 2.0, "winograd": 1.0})
    assert measure(KEY, CANDIDATES, timer=timer, cache=cache).choice == "winograd" and timer.calls


@pytest.mark.parametrize("content", ["{not json", '{"machine": {}, "entries": {}}', '{"entries": {"k": 3}}', "[]"])
def test_a_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten(cache, content):
    path = cache.path(dispatch.machine_key())
    path.parent.mkdir(parents=True)
    path.write_text(content)
    timer = fixed_timer({"direct": 2.0, "winograd": 1.0})
    with pytest.warns(RuntimeWarning, match="corrupt.*ignoring it"):
        m = measure(KEY, CANDIDATES, timer=timer, cache=cache)
    assert m.source == "measured" and m.choice == "winograd" and timer.calls
    assert list(json.loads(path.read_text())["entries"].values())[0]["choice"] == "winograd"  # rewritten
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert measure(KEY, CANDIDATES, timer=fixed_timer({}), cache=DispatchCache(cache.directory)).source == "cached"


def test_an_unwritable_cache_folder_warns_once_and_still_works(tmp_path):
    blocker = tmp_path / "not-a-folder"  # a file in the way: nothing can be created under it, even by root
    blocker.write_text("")
    cache = DispatchCache(blocker / "dispatch")
    with pytest.warns(RuntimeWarning, match="not writable.*for this process only"):
        m = measure(KEY, CANDIDATES, timer=fixed_timer({"direct": 2.0, "winograd": 1.0}), cache=cache)
    assert m.choice == "winograd" and m.source == "measured"
    timer = fixed_timer({})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; the choice lives for the process
        assert measure(KEY, CANDIDATES, timer=timer, cache=cache).source == "cached" and timer.calls == []
        other = OpKey("attention", ((2, 8, 64, 16), (2, 8, 77, 16), False), "float32")
        assert measure(other, CANDIDATES, timer=fixed_timer({"direct": 1.0}), cache=cache).source == "measured"


def test_the_default_cache_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert dispatch.default_cache_dir() == tmp_path / "diffusion-runtime" / "dispatch"
    assert dispatch.default_cache().directory == tmp_path / "diffusion-runtime" / "dispatch"


def test_past_the_budget_the_eager_candidate_runs_unmeasured_and_uncached(cache):
    timer = fixed_timer({"direct": 2.0, "winograd": 1.0})
    with dispatch.session(budget_s=0.0):
        m = measure(KEY, CANDIDATES, timer=timer, cache=cache)
        assert m.choice == "direct" and m.source == "budget spent" and timer.calls == []
        assert "left to the eager operator unmeasured" in dispatch.current().describe()
    assert measure(KEY, CANDIDATES, timer=timer, cache=cache).source == "measured"  # the next optimize measures it


def test_unsteady_timings_decide_but_are_not_cached(cache):
    def unsteady(candidates):
        times = dispatch.Times({"direct": 2.0, "winograd": 1.0})
        times.steady = False  # what the wall timer says when repetitions disagree
        return times

    with dispatch.session():
        m = measure(KEY, CANDIDATES, timer=unsteady, cache=cache)
        assert m.choice == "winograd" and "unsteady timings" in m.note and "not cached" in m.summary()
        again = fixed_timer({})  # another module with the same call in this optimize: not timed twice
        assert measure(KEY, CANDIDATES, timer=again, cache=cache).choice == "winograd" and again.calls == []
    assert not cache.directory.exists() or not any(cache.directory.iterdir())
    timer = fixed_timer({"direct": 1.0, "winograd": 2.0})
    assert measure(KEY, CANDIDATES, timer=timer, cache=cache).source == "measured" and timer.calls  # next optimize


def test_refresh_times_again_what_the_cache_holds(cache):
    measure(KEY, CANDIDATES, timer=fixed_timer({"direct": 1.0, "winograd": 2.0}), cache=cache)
    timer = fixed_timer({"direct": 2.0, "winograd": 1.0})
    with dispatch.session(refresh=True):
        assert measure(KEY, CANDIDATES, timer=timer, cache=cache).choice == "winograd" and len(timer.calls) == 1
        assert measure(KEY, CANDIDATES, timer=timer, cache=cache).choice == "winograd" and len(timer.calls) == 1
    hit = fixed_timer({})
    assert measure(KEY, CANDIDATES, timer=hit, cache=DispatchCache(cache.directory)).choice == "winograd"
    assert hit.calls == []  # overwritten


def test_the_wall_timer_never_chooses_a_candidate_that_fails(cache):
    def broken():
        raise RuntimeError("the kernel returned 1")

    candidates = [Candidate("direct", lambda: torch.zeros(4).sum(), baseline=True), Candidate("winograd", broken)]
    with pytest.warns(RuntimeWarning, match="'winograd' failed while measured .*returned 1"):
        m = measure(KEY, candidates, timer=dispatch.wall_timer(max_rounds=3), cache=cache)
    assert m.choice == "direct" and math.isinf(m.times["winograd"]) and m.times["direct"] >= 0
    assert "winograd failed" in m.summary()


# ---- on a pipeline --------------------------------------------------------------------------------------
def test_the_probe_records_the_calls_without_touching_the_pipeline(pipe):
    before = pipeline_state(pipe)
    calls = probe_calls(pipe)
    assert_same_state(pipeline_state(pipe), before)
    assert calls.size == pipe.default_size() and calls.probed == ["vae", "unet"] and not calls.failed
    latent = pipe.default_size()[0] // pipe.vae_scale_factor
    unet_convs = [c for (model, _), seen in calls.calls["conv"].items() if model == "unet" for c in seen]
    assert ((2, pipe.unet.config.in_channels, latent, latent), False) in unet_convs  # conv_in, a guided batch
    assert any(add for _, add in unet_convs)  # the ResNet blocks' residuals go in through conv2
    cross = [c for (model, name), seen in calls.calls["attention"].items() if name.endswith("attn2") for c in seen]
    assert cross and all(k[2] == 77 and not masked for _, k, masked in cross)
    assert calls.calls["geglu"] and calls.calls["upsample"]
    assert not any(model == "text_encoder" for kind in calls.calls.values() for model, _ in kind)
    assert not any(name.startswith("encoder.") for model, name in calls.calls["conv"] if model == "vae")
    img2img = runtime.StableDiffusionImg2ImgPipeline.from_pipe(pipe)  # takes an image: the encoder runs too
    assert any(name.startswith("encoder.") for model, name in probe_calls(img2img).calls["conv"] if model == "vae")
    small = probe_calls(pipe, height=pipe.default_size()[0] // 2, width=8 * pipe.vae_scale_factor)
    assert ((2, pipe.unet.config.in_channels, latent // 2, 8), False) in [
        c for (model, _), seen in small.calls["conv"].items() if model == "unet" for c in seen]


def test_the_report_lists_times_and_choices(pipe, cache):
    timer = fixed_timer({"winograd": 1.0, "direct": 2.0, "fold": 2.0, "nearest+conv": 2.0, "ours": 1.0, "sdpa": 2.0,
                         "fused": 1.0, "unfused": 2.0})
    with dispatch.using(timer=timer, cache=cache):
        optim.optimize(pipe, level=1)
    report = pipe.optimization
    kernels = {"winograd": optim.winograd.kernel_ready(torch.float32), "attention": optim.attention._cpu_kernel_ready(
        torch.float32)}
    for name, why in kernels.items():
        if why is not None:
            continue
        records = report.dispatch[name]
        assert records and all(m.times and m.choice in m.times for m in records)
        assert "(measured)" in report.notes[name] and " ms" in report.notes[name]
        row = report.as_dict()["dispatch"][name][0]
        assert set(row) >= {"op", "shape", "dtype", "times_s", "choice", "source"}
    if any(why is None for why in kernels.values()):
        assert timer.calls and "timed" in report.notes["dispatch"] and str(cache.directory) in report.notes["dispatch"]
        hits = fixed_timer({})
        with dispatch.using(timer=hits, cache=cache):  # the same machine again: everything from the cache
            optim.optimize(pipe, level=1)
        assert hits.calls == [] and "timed 0 distinct calls" in pipe.optimization.notes["dispatch"]
        assert all(m.source in ("cached", "only candidate") for ms in pipe.optimization.dispatch.values() for m in ms)
    pipe.optimization.revert()


def test_optimize_measures_at_the_size_asked_for(pipe, cache):
    timer = fixed_timer({"winograd": 1.0, "direct": 2.0, "ours": 1.0, "sdpa": 2.0, "fused": 1.0, "unfused": 2.0})
    with dispatch.using(timer=timer, cache=cache):
        optim.optimize(pipe, level=1, dispatch={"height": 48, "width": 32})
    shapes = [m.key.shape[0] for m in pipe.optimization.dispatch.get("winograd", []) if m.key.op == "conv3x3"]
    if optim.winograd.kernel_ready(torch.float32) is None:
        f = pipe.vae_scale_factor
        assert (2, pipe.unet.config.block_out_channels[0], 48 // f, 32 // f) in shapes
    pipe.optimization.revert()
    for bad, match in [({"hieght": 64}, "unknown dispatch option.*hieght"), ({"height": 0}, "positive int"),
                       ({"budget_s": -1}, "non-negative"), ({"refresh": 1}, "True or False"),
                       ("fast", "must be a dict")]:
        with pytest.raises(OptimizationError, match=match):
            optim.optimize(pipe, level=1, dispatch=bad)
    assert pipe.optimization is None


def test_the_probe_is_read_back_from_the_cache_folder_by_a_new_process(pipe, cache, monkeypatch):
    from runtime.optim import probe_cache, shape_probe

    with dispatch.using(cache=cache), dispatch.ensure_session():
        probed = dispatch.probe(pipe)
    files = sorted(p.name for p in cache.directory.glob("probe-*.json"))
    assert len(files) == 1 and probed.probed == ["vae", "unet"]
    assert probe_cache.from_json(json.loads(json.dumps(probe_cache.to_json(probed)))) == probed  # exact round trip

    def no_twins(model):
        raise AssertionError("probed again although the cache folder holds the result")

    monkeypatch.setattr(shape_probe, "_twin", no_twins)
    with dispatch.using(cache=DispatchCache(cache.directory)), dispatch.ensure_session():  # a new process
        again = dispatch.probe(pipe)
    assert again == probed
    with dispatch.using(cache=cache, height=pipe.default_size()[0] // 2), dispatch.ensure_session():
        small = dispatch.probe(pipe)  # another size is another key: probed, and the twin refuses
    assert "vae" in small.failed and "unet" in small.failed
    assert len(list(cache.directory.glob("probe-*.json"))) == 1  # a failed probe is not kept


def test_a_corrupt_probe_file_is_ignored_with_a_warning_and_rewritten(pipe, cache):
    from runtime.optim import probe_cache, shape_probe

    with dispatch.using(cache=cache), dispatch.ensure_session():
        probed = dispatch.probe(pipe)
    path = next(cache.directory.glob("probe-*.json"))
    path.write_text('{"format": 1, "calls": 3}')
    with pytest.warns(RuntimeWarning, match="probe cache file .* corrupt"):
        with dispatch.using(cache=DispatchCache(cache.directory)), dispatch.ensure_session():
            again = dispatch.probe(pipe)
    assert again == probed
    assert probe_cache.from_json(json.loads(path.read_text())) == probed
    key = probe_cache.probe_key(pipe, shape_probe.image_size(pipe, None, None))
    pipe.vae.enable_tiling()  # the VAE's memory controls change the calls: another key
    try:
        assert probe_cache.probe_key(pipe, shape_probe.image_size(pipe, None, None)) != key
    finally:
        pipe.vae.disable_tiling()
