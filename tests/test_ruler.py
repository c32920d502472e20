"""RULER needle-in-a-haystack harness: metric, generator plumbing, harness vs. plain model."""

from __future__ import annotations

from pathlib import Path

import pytest

from csr_vllm.evaluation.ruler import SUPPORTED_TASKS, generate_tasks, score


def test_score_string_match_all() -> None:
    assert score("The number is 8090293.", ["8090293"]) == 1.0
    assert score("the KEY is abc-DEF", ["Abc-def"]) == 1.0  # case-insensitive
    assert score("nothing here", ["8090293"]) == 0.0
    assert score("1234 and 5678", ["1234", "5678", "9999", "0000"]) == 0.5
    assert score("809029", ["8090293"]) == 0.0  # a truncated needle does not count
    with pytest.raises(ValueError):
        score("x", [])


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multivalue", "qa_1", "no_such_task"])
def test_unsupported_task_names_supported_ones(task: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        generate_tasks(task, tmp_path, 1024, 1, cache_dir=tmp_path)
    for name in SUPPORTED_TASKS:
        assert name in str(err.value)
    if task.startswith("niah_"):
        assert "punkt" in str(err.value)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from csr_vllm.model_fetch import fetch_model

    return fetch_model()


@pytest.fixture(scope="module")
def samples(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from csr_vllm.data.corpora import long_context_eval_root

    # A fresh cache so prepare.py really runs, sharing the already unpacked RULER wheel.
    cache = tmp_path_factory.mktemp("cache")
    (cache / "data").mkdir()
    lce = long_context_eval_root()
    (cache / "data" / lce.name).symlink_to(lce, target_is_directory=True)
    return generate_tasks("niah_single_1", model_dir, 1024, 2, cache_dir=cache), cache


@pytest.fixture(scope="module")
def model_and_tokenizer(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.mark.slow
def test_generated_samples_fit_and_hold_the_needle(samples, model_and_tokenizer,
                                                   model_dir: Path) -> None:
    from csr_vllm.evaluation.ruler import prompt_ids

    trials, cache = samples
    _, tokenizer = model_and_tokenizer
    assert len(trials) == 2
    for s in trials:
        assert s.outputs and all(o in s.input for o in s.outputs)
        assert s.input.endswith("mentioned in the provided text is")  # the answer prefix
        assert len(prompt_ids(tokenizer, s.input)) <= 1024
        assert s.length <= 1024
    # Second call: served from the cache, identical.
    again = generate_tasks("niah_single_1", model_dir, 1024, 2, cache_dir=cache)
    assert again == trials


@pytest.mark.slow
def test_exact_method_matches_plain_model(samples, model_and_tokenizer) -> None:
    from csr_vllm.evaluation.methods import Exact
    from csr_vllm.evaluation.ruler import evaluate

    trials, _ = samples
    model, tokenizer = model_and_tokenizer
    plain = evaluate(model, tokenizer, trials, None, guard=64, progress=False)
    # A guard shorter than the prompt so most keys go through the (exact) reconstruction path.
    harness = evaluate(model, tokenizer, trials, Exact(), guard=64, progress=False)
    assert harness.predictions == plain.predictions
    assert harness.correct == plain.correct
    assert harness.method == "exact" and plain.method == "model"
    assert all(p for p in plain.predictions)


@pytest.mark.slow
def test_answer_budget_fits_uuid_needles(model_and_tokenizer) -> None:
    from csr_vllm.evaluation.ruler import answer_budget

    _, tokenizer = model_and_tokenizer
    uuid = "757750a9-a491-40b2-aa1f-ca65e27a984d"
    assert answer_budget(tokenizer, [uuid]) >= len(tokenizer.tokenize(" " + uuid)) + 1
    assert answer_budget(tokenizer, ["8090293"]) < answer_budget(tokenizer, ["8090293", "1234567"])


def test_run_ruler_keeps_cached_results_and_computes_nothing(tmp_path):
    """A resumed sweep: entries already present are neither recomputed nor reported again."""
    from csr_vllm.evaluation.methods import make_method
    from csr_vllm.evaluation.ruler import run_ruler

    (tmp_path / "config.json").write_text("{}")
    cached = {"bf16": {"1024": {"correct": 3, "trials": 4, "setting": "bf16"}}}
    calls = []
    out = run_ruler(tmp_path, "niah_single_1", [1024], 4, {"bf16": make_method("bf16")}, 128,
                    model=object(), tokenizer=object(), results=cached,
                    on_result=lambda: calls.append(1))
    assert out is cached and out["bf16"]["1024"]["correct"] == 3 and not calls


def fake_trials(monkeypatch, count: int, wrong: set[str] = frozenset()) -> list[str]:
    """Replace RULER's generator and evaluation: ``count`` trials q0.., answered correctly
    except those in ``wrong``; returns the list the inputs evaluated are appended to."""
    import csr_vllm.evaluation.ruler as ruler

    trials = [ruler.RulerSample(index=i, input=f"q{i}", outputs=[str(i)], length=1024)
              for i in range(count)]
    monkeypatch.setattr(ruler, "generate_tasks", lambda *a, **k: trials)
    seen: list[str] = []

    def fake_evaluate(model, tokenizer, samples, method, guard, max_new_tokens, progress,
                      on_trial=None):
        for s in samples:
            seen.append(s.input)
            on_trial(s.input not in wrong, s.outputs[0])

    monkeypatch.setattr(ruler, "evaluate", fake_evaluate)
    return seen


def test_run_ruler_resumes_a_partial_entry_from_its_next_trial(tmp_path, monkeypatch):
    """An interrupted length continues where it stopped, on the same seeded trials."""
    import csr_vllm.evaluation.ruler as ruler
    from csr_vllm.evaluation.methods import make_method

    seen = fake_trials(monkeypatch, 5, wrong={"q3"})
    partial = {"bf16": {"1024": {"per_trial": [True, False], "predictions": ["0", "x"],
                                 "correct": 1, "trials": 2, "complete": False,
                                 "setting": "bf16"}}}
    saves = []
    ruler.run_ruler(tmp_path, "niah_single_1", [1024], 5, {"bf16": make_method("bf16")}, 128,
                    model=object(), tokenizer=object(), results=partial,
                    on_result=lambda: saves.append(dict(partial["bf16"]["1024"])))
    entry = partial["bf16"]["1024"]
    assert seen == ["q2", "q3", "q4"]
    assert entry["per_trial"] == [True, False, True, False, True]
    assert entry["predictions"] == ["0", "x", "2", "3", "4"]
    assert (entry["correct"], entry["trials"], entry["accuracy"]) == (3, 5, 0.6)
    assert "complete" not in entry
    # persisted after every trial, marked partial until the last one
    assert [s["trials"] for s in saves] == [3, 4, 5, 5]
    assert [s.get("complete", True) for s in saves] == [False, False, False, True]


def test_run_ruler_reruns_an_entry_made_with_another_setting(tmp_path, monkeypatch):
    """A preset that changed (same name, other codec) is not reported with the old numbers."""
    import csr_vllm.evaluation.ruler as ruler
    from csr_vllm.evaluation.methods import make_method

    seen = fake_trials(monkeypatch, 3)
    stale = {"bf16": {"1024": {"per_trial": [False] * 3, "predictions": ["x"] * 3,
                               "correct": 0, "trials": 3, "setting": "an old codec"}}}
    ruler.run_ruler(tmp_path, "niah_single_1", [1024], 3, {"bf16": make_method("bf16")}, 128,
                    model=object(), tokenizer=object(), results=stale)
    assert seen == ["q0", "q1", "q2"]
    assert stale["bf16"]["1024"]["correct"] == 3 and stale["bf16"]["1024"]["setting"] == "bf16"


def test_csr_setting_names_the_codec_of_each_tensor(tmp_path):
    import torch

    from csr_vllm.codec.config import get_preset
    from csr_vllm.codec.dictionary import DictionarySet, ModelShape
    from csr_vllm.evaluation.methods import CSR

    shape = ModelShape("LlamaForCausalLM", 1, 1, 64, 10000.0)
    cfg = get_preset("csr-1b").config_for(64)
    atoms = torch.nn.functional.normalize(torch.randn(1, 1, 1, 8192, 64), dim=-1)
    d = DictionarySet(cfg, shape, atoms, atoms)
    assert CSR(d, "csr-1b").setting == "K 1x4xlog5/8192omp V 1x3xlog5/8192omp rope=pre"
    assert CSR(d, "x", adapt=3).setting.endswith("adapt=3/128")


def test_run_ruler_copies_a_finished_entry_with_the_same_setting(tmp_path, monkeypatch):
    """A preset redefined as an option it was measured with (csr-2b taking over
    csr-2b+coef=log5) reuses that entry instead of rerunning the same trials."""
    import csr_vllm.evaluation.ruler as ruler
    from csr_vllm.evaluation.methods import make_method

    seen = fake_trials(monkeypatch, 3)
    done = {"per_trial": [True, False, True], "predictions": ["0", "x", "2"], "correct": 2,
            "trials": 3, "setting": "bf16"}
    results = {"measured-as-option": {"1024": done},
               "short": {"2048": dict(done, trials=2, per_trial=[True, True])}}
    ruler.run_ruler(tmp_path, "niah_single_1", [1024, 2048], 3, {"bf16": make_method("bf16")},
                    128, model=object(), tokenizer=object(), results=results)
    assert results["bf16"]["1024"] == done and results["bf16"]["1024"] is not done
    # 2048: the only entry has another trial count, so the trials run.
    assert seen == ["q0", "q1", "q2"] and results["bf16"]["2048"]["trials"] == 3


def test_a_renamed_preset_does_not_hide_the_entry_its_old_setting_moves_to(tmp_path,
                                                                           monkeypatch):
    """csr-2b redefined (fp8 -> log5): csr-2b copies csr-2b+coef=log5's entry and
    csr-2b+coef=fp8 copies csr-2b's old one, whatever order the methods come in."""
    import csr_vllm.evaluation.ruler as ruler
    from csr_vllm.evaluation.methods import KVMethod

    class Named(KVMethod):
        def __init__(self, setting):
            self.name, self._setting = setting, setting

        @property
        def setting(self):
            return self._setting

        def bits_per_channel(self, head_dim):
            return 2.0

        def compress(self, layer, keys, values, positions):
            return keys, values

    seen = fake_trials(monkeypatch, 2)
    old = {"per_trial": [False, True], "predictions": ["x", "1"], "correct": 1, "trials": 2,
           "setting": "fp8"}
    new = dict(old, per_trial=[True, True], correct=2, setting="log5")
    results = {"csr-2b": {"1024": old}, "csr-2b+coef=log5": {"1024": new}}
    methods = {"csr-2b": Named("log5"), "csr-2b+coef=fp8": Named("fp8")}
    ruler.run_ruler(tmp_path, "niah_single_1", [1024], 2, methods, 128, model=object(),
                    tokenizer=object(), results=results)
    assert not seen
    assert results["csr-2b"]["1024"] == new and results["csr-2b+coef=fp8"]["1024"] == old

