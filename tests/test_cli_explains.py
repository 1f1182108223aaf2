"""A CLI that explains itself: --version, keys in --help, the reward-model judge as the evaluation reward,
one-line errors for bad reward-model paths and unevaluable judges, the model card, push_to_hub without network."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from selfalign.cli import main
from selfalign.config import describe
from selfalign.loop import RunConfig
from tests.test_bad_input import check_refused, files, out, sorting  # noqa: F401 - fixtures
from tests.test_judges import _reward_model_dir

TINY = ["iterations=1", "generation.num_samples=2", "generation.max_new_tokens=6", "train.batch_size=4",
        "train.micro_batch_size=4", "eval.samples=1"]


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert re.fullmatch(r"selfalign \d+\.\d+\.\d+\S*", capsys.readouterr().out.strip())


def test_run_help_lists_the_most_used_keys_with_defaults_and_help_all_lists_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "--help-all" in text and "selfalign config run" in text
    rows = {line.split()[0]: line.split()[1] for line in text.split("\nmost used config keys")[1].splitlines()[1:] if line.strip()}
    assert rows["method"] == "'selm'" and rows["train.beta"] == "0.1" and rows["judge.kind"] == "'function'"
    assert {"judge.llm.base_url", "eval.reward_model", "push_to_hub"} <= set(text.split())
    with pytest.raises(SystemExit):
        main(["run", "--help-all"])
    every = capsys.readouterr().out
    listed = {line.split()[0] for line in every.splitlines()[1:]}
    assert listed == {key for key, _, _ in describe(RunConfig)}
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "data.path" in capsys.readouterr().out


@pytest.fixture
def rm_run(tmp_path, files):  # noqa: F811 - the fixture imported above
    """A run of the sorting model judged by a reward model, with held-out prompts and no reward function."""
    rm = _reward_model_dir(tmp_path / "rm")
    return [*TINY, f"model={files['model']}", f"prompts={files['prompts']}", f"eval_prompts={files['prompts']}",
            "prompts_per_iteration=4", "eval.prompts=4", "judge.kind=reward_model", f"judge.reward_model={rm}",
            f"output_dir={tmp_path / 'run'}"], tmp_path / "run", rm


def test_a_reward_model_judge_is_the_evaluation_reward_and_the_table_has_no_empty_column(rm_run, capsys):
    """Before, this run skipped held-out evaluation silently and printed blank reward columns."""
    argv, run_dir, rm = rm_run
    assert main(["run", "quickstart", *argv, "--no-progress"]) == 0
    metrics = json.loads((run_dir / "iter_000" / "metrics.json").read_text())
    assert {"gold/greedy", "gold/sampled", "win_rate", "kl_to_pi0"} <= set(metrics)
    # The reward model scored the held-out answers: rescoring them with it gives the same numbers.
    from selfalign.judges.reward_model import RewardModelJudge

    rows = [json.loads(line) for line in (run_dir / "iter_000" / "eval_responses.jsonl").read_text().splitlines()]
    greedy = RewardModelJudge(rm).score([r["prompt"] for r in rows], [[r["greedy"]] for r in rows])
    assert metrics["gold/greedy"] == pytest.approx(sum(s[0] for s in greedy) / len(greedy), abs=1e-5)
    table = capsys.readouterr().out.strip().splitlines()[-3:]  # header, pi_0, iteration 0
    assert "reward (greedy)" in table[0] and "cut (sampled)" in table[0]
    # Every column filled, pi_0's included: a blank cell would leave a row with fewer cells than the header.
    cells = [re.split(" {2,}", line.strip()) for line in table]
    assert all(len(c) == len(cells[0]) for c in cells[1:]), "\n".join(table)
    # `selfalign eval RUN` evaluates with the run's reward model too.
    assert main(["eval", str(run_dir), "--no-progress"]) == 0
    assert f"reward model {rm}" in capsys.readouterr().out


def test_unevaluable_judges_and_bad_eval_reward_models_are_one_line_errors(rm_run, files, out, capsys):  # noqa: F811
    argv, _, _ = rm_run
    argv = [a for a in argv if not a.startswith("output_dir=")] + [f"output_dir={out}"]
    check_refused(["run", "quickstart", *argv, "judge.kind=pairwise", "judge.function=tests.judge_fns:longer_wins"],
                  out, capsys, "eval: judge.kind=pairwise gives no reward to score the held-out prompts")
    check_refused(["run", "quickstart", *argv, f"eval.reward_model={files['dir'] / 'no-rm'}"], out, capsys,
                  f"eval.reward_model: {files['dir'] / 'no-rm'}: no such file or directory")
    check_refused(["run", "quickstart", *argv, "judge.reward_model=nobody-here/no-such-rm"], out, capsys,
                  "judge.reward_model: nobody-here/no-such-rm: cannot load")


def test_model_card_beside_the_final_policy(tmp_path, builtin_task):
    run_dir = tmp_path / "run"
    assert main(["run", "quickstart", *TINY, "prompts_per_iteration=8", "eval.prompts=4", f"output_dir={run_dir}",
                 "--no-progress"]) == 0
    card = (run_dir / "iter_000" / "policy" / "README.md").read_text()
    metrics = json.loads((run_dir / "iter_000" / "metrics.json").read_text())
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "selm" in front["tags"]
    assert "- base model (pi_0): `builtin`" in card and "- method: `selm` (loss `selm`, beta 0.1" in card
    assert "- iterations: 1 of 8 prompts, 2 samples per prompt" in card
    assert f"| 0 | {metrics['labels_total']} | {metrics['gold/greedy']:.3f} | {metrics['gold/sampled']:.3f} | " \
           f"{metrics['win_rate']:.3f} | {metrics['kl_to_pi0']:.3f} |" in card
    assert "time" not in card.lower()  # nothing that differs between two runs of one command
    # Like TRL's cards: the versions that trained it, the method's citation; metadata the hub reads.
    import torch
    import transformers

    assert f"- Transformers: {transformers.__version__}" in card and f"- PyTorch: {torch.__version__}" in card
    assert "@article{zhang2024selm" in card and "arXiv:2405.19332" in card
    assert 'from_pretrained("PATH/TO/THIS/DIRECTORY")' in card and "base_model" not in front
    # A finished run re-run writes the same card.
    assert main(["run", "quickstart", *TINY, "prompts_per_iteration=8", "eval.prompts=4", f"output_dir={run_dir}",
                 "--no-progress"]) == 0
    assert (run_dir / "iter_000" / "policy" / "README.md").read_text() == card


def test_train_writes_a_card_and_push_to_hub_without_network_is_one_line(tmp_path, sorting, capsys):  # noqa: F811
    model_dir, pairs = sorting
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(model_dir), "output_dir": str(tmp_path / "run"),
                                      "data": {"path": str(pairs)}, "train": {"batch_size": 8, "micro_batch_size": 8},
                                      "push_to_hub": "someone/sorting-dpo"}))
    code = main(["train", str(recipe), "--no-progress"])  # HF_HUB_OFFLINE=1 (conftest): no network
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "push_to_hub: could not upload" in err and "the run is complete" in err and "hf upload someone/sorting-dpo" in err
    card = (tmp_path / "run" / "policy" / "README.md").read_text()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert f"- base model: `{model_dir}`" in card and "- loss: `dpo`, beta 0.1" in card
    assert 'from_pretrained("someone/sorting-dpo")' in card and "@inproceedings{rafailov2023dpo" in card
    acc = summary["after"]["eval/rewards/accuracies"]
    assert f"| eval/rewards/accuracies | {summary['before']['eval/rewards/accuracies']:.3f} | {acc:.3f} |" in card
    assert Path(tmp_path / "run" / "policy" / "config.json").exists()


def test_card_metadata_names_smollm2_and_a_local_base_models_license(tmp_path):
    """`model: constraints` links the hub's SmolLM2 with its license; a local base directory's own card gives
    its license; IPO's citation comes with train.loss=ipo."""
    from selfalign.card import _citations, _front_matter

    front = yaml.safe_load(_front_matter("constraints", ["selfalign"]).split("---")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["license"] == "apache-2.0"
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    front = yaml.safe_load(_front_matter(str(base), ["selfalign"]).split("---")[1])
    assert front["license"] == "mit" and "base_model" not in front
    assert "azar2023ipo" in "\n".join(_citations("iterative_dpo", "ipo"))
    assert "ding2024sail" in "\n".join(_citations("sail_pr", "sail")) and _citations("", "sail") == \
        _citations("sail_dp", "sail")
