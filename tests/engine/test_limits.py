"""One home per limit (nodes/engine/limits.py; the providers' in nodes/remote/request.py): a refused
value gets the same message from the Python API (the engine) and the command line, and the pipeline's stages
composed by hand (what the speed benchmark does) give exactly what `generate` gives."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from random_pipelines import make_pipeline, noise_image

from nodes import api
from nodes.cli import command as cli
from nodes.engine import InputError, vae
from nodes.jobs.backend import Backend
from nodes.engine.limits import (BATCH_SIZE, DENOISE, GUIDANCE, HEIGHT, LONG_SIDE, SEED, STEPS, WIDTH,
                                 Limit)
from nodes.remote import request


def test_a_refusal_names_the_input_the_allowed_values_and_what_to_use():
    assert WIDTH.problem(1000) == ("width: 1000 is not a multiple of 16 (FLUX works on 16 px patches; 1024 is "
                                   "USO's native size); use 992 or 1008.")
    assert STEPS.problem(0) == "steps: 0 is outside 1..200 (the reference uses 25)."
    assert BATCH_SIZE.problem(2.0) == "batch_size: expected a whole number, got 2.0."
    assert GUIDANCE.problem(float("nan")) == "guidance: nan is not a number; use 0.0..20.0 (the reference uses 4.0)."
    assert GUIDANCE.problem(float("inf")) == "guidance: inf is outside 0.0..20.0 (the reference uses 4.0)."
    assert GUIDANCE.problem(4) is None and STEPS.problem(True) is not None


@settings(max_examples=200, deadline=None)
@given(value=st.one_of(st.integers(-50, 5000), st.floats(allow_nan=True), st.booleans(), st.none()))
def test_a_limit_allows_exactly_the_values_in_its_range_and_multiple(value):
    for limit in (WIDTH, LONG_SIDE, STEPS, DENOISE):
        whole = isinstance(limit.low, int)
        number = isinstance(value, int) if whole else isinstance(value, (int, float))
        valid = number and not isinstance(value, bool) and limit.low <= value <= limit.high \
            and (limit.multiple == 1 or value % limit.multiple == 0)
        problem = limit.problem(value)
        assert (problem is None) == valid
        assert problem is None or problem.startswith(f"{limit.name}: ")


@pytest.fixture(scope="module")
def pipe():
    return make_pipeline(torch.float32)


def _api_refusal(pipe, limit: Limit, value) -> str:
    """The Python API's message for `value` (the engine checks it where it enters)."""
    extra = {"subject": noise_image(40, 30, 1)} if limit is LONG_SIDE else {}
    with pytest.raises(InputError) as err:
        api.LocalUSO(pipe, Backend(tiny=True)).generate("x", **{"width": 64, "height": 64, "steps": 2, limit.name: value, **extra})
    return str(err.value)


@pytest.mark.parametrize("limit,value", [(WIDTH, 1000), (HEIGHT, 5000), (STEPS, 0), (GUIDANCE, 25.0),
                                         (DENOISE, 1.5), (SEED, -1), (BATCH_SIZE, 17), (LONG_SIDE, 500)])
def test_python_api_and_command_line_refuse_with_the_same_message(pipe, limit, value, tmp_path, capsys):
    message = limit.problem(value)
    assert message is not None and _api_refusal(pipe, limit, value) == message
    flag = "--" + limit.name.replace("_", "-")
    code = cli.main(["--tiny", "--prompt", "x", flag, str(value), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {message}" in err.splitlines()


def test_the_command_line_reads_the_providers_limits_from_the_remote_request(tmp_path, capsys):
    style = noise_image(32, 32, 3)
    style.save(tmp_path / "style.png")
    top = request.STEPS_RANGE[1]
    argv = ["--provider", "fal", "--prompt", "x", "--style", str(tmp_path / "style.png"), "--out", str(tmp_path)]
    assert cli.main(argv + ["--steps", str(top + 1)]) == 2
    assert f"error: steps: {top + 1} is outside 1..{top} (fal/AIML's range)." in capsys.readouterr().err
    low = request.SIDE_RANGE[0]
    assert cli.main(argv + ["--width", str(low - 16)]) == 2
    assert f"error: width: {low - 16} is outside {low}..{request.SIDE_RANGE[1]}" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["text", "style+subject", "img2img"])
def test_the_stages_by_hand_give_what_generate_gives(pipe, case):
    """generate = check_inputs -> encode_references -> prepare_timesteps -> prepare_latents ->
    denoise_latents -> unscale; the benchmark's USOStep calls the same stages."""
    styles = pipe.encode_style([noise_image(60, 60, 1)]) if case == "style+subject" else None
    subjects = pipe.encode_subject([noise_image(64, 64, 2)], long_side=64) if case == "style+subject" else None
    init = pipe.encode_image_latents(noise_image(64, 48, 9)) if case == "img2img" else None
    denoise = 0.6 if case == "img2img" else 1.0
    want = pipe.generate("a cat", styles=styles, subjects=subjects, width=64, height=48, steps=3, seeds=[5],
                         init_latents=init, denoise=denoise).latents
    run = pipe.check_inputs([5], 64, 48, False, 3, 4.0, "reference", denoise, init, styles, subjects, False)
    conditioning = pipe.encode_references("a cat", styles, subjects)
    timesteps = pipe.prepare_timesteps(3, 64, 48, "reference", denoise)
    assert len(timesteps) - 1 == (2 if case == "img2img" else 3)  # denoise 0.6: int(3 - 1.8) = 1 step skipped
    start = pipe.prepare_latents(5, 64, 48, run.start_latent(0), timesteps[0])
    got = vae.unscale(pipe.vae, pipe.denoise_latents(start, conditioning, timesteps, 4.0)).cpu()
    assert torch.equal(got, want)
