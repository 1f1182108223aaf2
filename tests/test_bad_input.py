"""Bad input, as a new user gives it: one actionable line, exit status 2, no traceback, the run directory untouched.

Every case runs the command line in-process against an output directory that already holds a
file of the user's (and, for the resume cases, a run); the directory's files are hashed before
and after and must be identical: no config.yaml, lock, temporary or stage file is left behind.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selfalign.cli import TrainRunConfig, main
from selfalign.config import ConfigError, dump_yaml, load_config
from selfalign.loop import RunConfig
from selfalign.rundir import _start_time

TINY = ["iterations=1", "prompts_per_iteration=8", "generation.num_samples=2", "generation.max_new_tokens=6",
        "train.batch_size=4", "train.micro_batch_size=4", "eval.prompts=4", "eval.samples=1"]
GOOD_PROMPT = '{"prompt": "sort : 3 1 2"}\n'
GOOD_PAIR = '{"prompt": "sort : 2 1", "chosen": "1 2", "rejected": "2 1"}\n'


def digest(root: Path) -> dict[str, str] | None:
    if not root.exists():
        return None
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def sorting(tmp_path_factory):
    from selfalign.tasks.sorting import build_task

    return build_task(tmp_path_factory.mktemp("sorting"), n_rows=24)


@pytest.fixture(scope="module")
def files(tmp_path_factory, sorting):
    """Bad (and good) inputs on disk, named by what is wrong with them."""
    d = tmp_path_factory.mktemp("inputs")
    model_dir, pairs = sorting
    f = {"dir": d, "model": model_dir, "pairs": pairs}

    def put(name: str, content: str | bytes) -> Path:
        path = d / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        f[name.split(".")[0]] = path
        return path

    put("prompts.jsonl", GOOD_PROMPT * 4)
    put("broken_json.jsonl", GOOD_PROMPT + '{"prompt": "sort : 3\n')
    put("list_row.jsonl", GOOD_PROMPT + '["sort : 1 2"]\n')
    put("empty.jsonl", "\n\n")
    put("parquet.parquet", b"PAR1\x15\x04\x15\x10\x15\x14L\x15\x02\x15\x00\x12\x00\x00\x08\x1c\x00PAR1")
    put("binary.jsonl", GOOD_PROMPT.encode() + b"\xff\xfe\x00\x81garbage\n")
    put("messages.jsonl", '{"prompt": [{"role": "user", "content": "sort : 2 1"}]}\n')
    put("messages_pairs.jsonl", '{"prompt": [{"role": "user", "content": "sort : 2 1"}], "chosen": "1 2", '
                                '"rejected": "2 1"}\n' * 4)
    put("no_rejected.jsonl", GOOD_PAIR + '{"prompt": "sort : 1 2", "chosen": "1 2"}\n')
    put("bad_yaml.yaml", "method: selm\ntrain:\n  beta: [0.1\n")
    put("list_yaml.yaml", "- method: selm\n")
    put("a_file", "not a directory\n")
    (d / "a_folder.jsonl").mkdir()
    f["a_folder"] = d / "a_folder.jsonl"
    (d / "no_config").mkdir()
    f["no_config"] = d / "no_config"
    no_weights = d / "no_weights"
    no_weights.mkdir()
    shutil.copy(model_dir / "config.json", no_weights / "config.json")
    f["no_weights"] = no_weights
    # The sorting model with its tokenizer's chat template removed.
    plain = d / "no_template"
    shutil.copytree(model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    f["no_template"] = plain
    # The sorting model with a chat template that refuses any role but user and assistant (as Gemma's and
    # Mistral's templates refuse a system turn, through raise_exception).
    strict = d / "strict_template"
    shutil.copytree(model_dir, strict)
    (strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
        "<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    f["strict_template"] = strict
    # A causal LM whose config.json claims a sequence-classification architecture: its checkpoint has no score head.
    relabelled = d / "relabelled_lm"
    shutil.copytree(model_dir, relabelled)
    config = json.loads((relabelled / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (relabelled / "config.json").write_text(json.dumps(config))
    f["relabelled_lm"] = relabelled
    put("system_turn.jsonl", '{"prompt": [{"role": "user", "content": "sort : 2 1"}]}\n'
                             '{"prompt": [{"role": "user", "content": "sort : 2 1"}, {"role": "assistant", "content": '
                             '"1 2"}, {"role": "system", "content": "be brief"}]}\n')
    return f


def train_recipe(files, out: Path, **extra) -> Path:
    recipe = {"model": str(files["model"]), "output_dir": str(out), "data": {"path": str(files["pairs"])},
              "train": {"batch_size": 8, "micro_batch_size": 8}, **extra}
    path = out.parent / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# (case id, argv builder(files, out), message the one line must contain)
RUN = ["run", "quickstart", *TINY]
CASES = [
    # Config and YAML.
    ("unknown key", lambda f, o: [*RUN, "iteration=3"], "did you mean 'iterations'"),
    ("wrong type", lambda f, o: [*RUN, "iterations=two"], "iterations: expected an integer, got 'two'"),
    ("beta out of range", lambda f, o: [*RUN, "train.beta=-1"], "train.beta: must be > 0"),
    ("beta zero", lambda f, o: [*RUN, "train.beta=0"], "train.beta: must be > 0, got 0.0"),
    ("beta infinite", lambda f, o: [*RUN, "train.beta=inf"], "train.beta: must be a finite number, got inf"),
    ("beta not a number", lambda f, o: [*RUN, "train.beta=nan"], "train.beta: must be a finite number, got nan"),
    ("learning rate infinite", lambda f, o: [*RUN, "train.learning_rate=inf"],
     "train.learning_rate: must be a finite number, got inf"),
    ("grad norm not a number", lambda f, o: [*RUN, "train.max_grad_norm=nan"],
     "train.max_grad_norm: must be a finite number, got nan"),
    ("sail coefficient infinite", lambda f, o: [*RUN, "method=sail_dp", "train.sail.rho=inf"],
     "train.sail.rho: must be a finite number, got inf"),
    ("negative eval prompts", lambda f, o: [*RUN, "eval.prompts=-1"],
     "eval.prompts: must be >= 0 (0 disables evaluation), got -1"),
    ("zero eval samples", lambda f, o: [*RUN, "eval.samples=0"], "eval.samples: must be >= 1, got 0"),
    ("greedy samples with a noiseless judge", lambda f, o: [*RUN, "generation.temperature=0", "judge.noise=0"],
     "generation.temperature: 0 is greedy decoding: the 2 responses to a prompt are identical"),
    ("unknown method", lambda f, o: [*RUN, "method=ppo"], "method: expected one of"),
    ("one sample", lambda f, o: [*RUN, "generation.num_samples=1"], "generation.num_samples: must be >= 2"),
    ("selm_official with policy samples", lambda f, o: [*RUN, "method=selm_official"],
     "generation.num_samples: selm_official generates one response per prompt (pi_ref's greedy y_ref, ranked with "
     "the preference file's chosen and rejected, as SELM's code does) and no policy samples; set "
     "generation.num_samples=1 (got 2)"),
    ("selm_official with a prompt file",
     lambda f, o: [*RUN, "method=selm_official", "generation.num_samples=1", f"prompts={f['prompts']}"],
     "prompts: selm_official answers the preference file's prompts (preferences=, preferences_split=), which "
     "prompts= cannot change; drop prompts="),
    ("selm_official with a prompt split",
     lambda f, o: [*RUN, "method=selm_official", "generation.num_samples=1", "prompts_split=train[:8]"],
     "prompts_split: selm_official answers the preference file's prompts (preferences=, preferences_split=), "
     "which prompts_split= cannot change; drop prompts_split=train[:8]"),
    ("too few prompts", lambda f, o: [*RUN, "prompts_per_iteration=100000"], "prompts, but only"),
    ("learning rates per iteration", lambda f, o: [*RUN, "iteration_learning_rates=[0.1,0.2]"],
     "needs one value per iteration"),
    ("chunk size 0", lambda f, o: [*RUN, "judge.chunk_size=0"], "judge.chunk_size: must be >= 1"),
    ("negative noise", lambda f, o: [*RUN, "judge.noise=-1"], "judge.noise: must be >= 0"),
    ("warmup ratio", lambda f, o: [*RUN, "train.warmup_ratio=1.5"], "train.warmup_ratio: must be in [0, 1)"),
    ("sail probability", lambda f, o: [*RUN, "method=sail_dp", "train.sail.r=2"], "is a probability, must be <= 1"),
    ("override without =", lambda f, o: [*RUN, "train.batch_size"], "is not of the form key.sub=value"),
    ("YAML syntax", lambda f, o: ["run", str(f["bad_yaml"])], "bad_yaml.yaml line 4: not valid YAML"),
    ("YAML list", lambda f, o: ["run", str(f["list_yaml"])], "the top level must be a mapping"),
    ("missing recipe file", lambda f, o: ["run", str(f["dir"] / "nope.yaml")], "nope.yaml does not exist"),
    ("unknown bundled recipe", lambda f, o: ["run", "quikstart"], "no bundled recipe of that name"),
    # Data files.
    ("missing prompt file", lambda f, o: [*RUN, f"prompts={f['dir'] / 'nope.jsonl'}"], "nope.jsonl: file not found"),
    ("prompt file is a folder", lambda f, o: [*RUN, f"prompts={f['a_folder']}"],
     "a_folder.jsonl: a folder that is neither a save_to_disk dataset nor a folder of data files"),
    ("broken JSON line", lambda f, o: [*RUN, f"prompts={f['broken_json']}"], "broken_json.jsonl line 2: not valid JSON"),
    ("row not an object", lambda f, o: [*RUN, f"prompts={f['list_row']}"], "line 2: expected a JSON object, got list"),
    ("empty prompt file", lambda f, o: [*RUN, f"prompts={f['empty']}"], "empty.jsonl: no prompts"),
    ("damaged Parquet prompt file", lambda f, o: [*RUN, f"prompts={f['parquet']}"],
     "parquet.parquet: not a readable Parquet file"),
    ("uncached hub dataset", lambda f, o: [*RUN, "prompts=nobody-here/no-such-dataset"],
     "nobody-here/no-such-dataset: no such file or folder, and the dataset is not in the local Hugging Face cache"),
    ("missing Parquet file", lambda f, o: [*RUN, f"prompts={f['dir'] / 'nope.parquet'}"], "nope.parquet: file not found"),
    ("binary prompt file", lambda f, o: [*RUN, f"prompts={f['binary']}"], "binary.jsonl: not UTF-8 text"),
    ("wrong prompt column", lambda f, o: [*RUN, f"prompts={f['prompts']}", "prompt_field=text"],
     "line 1: missing field 'text'"),
    ("messages without a chat template",
     lambda f, o: [*RUN, f"model={f['no_template']}", f"prompts={f['messages']}", "judge.function=tests.judge_fns:length"],
     "messages.jsonl line 1: the prompt is a list of chat messages but the tokenizer has no chat template"),
    ("a role the chat template refuses",
     lambda f, o: [*RUN, f"model={f['strict_template']}", f"prompts={f['system_turn']}",
                   "judge.function=tests.judge_fns:length"],
     "system_turn.jsonl line 2: the tokenizer's chat template rejects message 3 (role 'system'): Only user and "
     "assistant roles are supported!"),
    # Model, reward-model and judge paths.
    ("misspelt model path", lambda f, o: [*RUN, f"model={f['dir'] / 'modle'}", f"prompts={f['prompts']}",
                                          "judge.function=tests.judge_fns:length"],
     "model: {dir}/modle: no such file or directory"),
    ("model folder without config.json", lambda f, o: [*RUN, f"model={f['no_config']}", f"prompts={f['prompts']}",
                                                       "judge.function=tests.judge_fns:length"], "has no config.json"),
    ("model without weights", lambda f, o: [*RUN, f"model={f['no_weights']}", f"prompts={f['prompts']}",
                                            "judge.function=tests.judge_fns:length"], "has a config.json but no weights"),
    ("model is a file", lambda f, o: [*RUN, f"model={f['a_file']}", f"prompts={f['prompts']}",
                                      "judge.function=tests.judge_fns:length"], "is a file but not a .gguf model"),
    ("uncached hub model", lambda f, o: [*RUN, "model=nobody-here/no-such-model", f"prompts={f['prompts']}",
                                         "judge.function=tests.judge_fns:length"],
     "nobody-here/no-such-model: cannot load a tokenizer"),
    ("model without prompts", lambda f, o: [*RUN, f"model={f['model']}", "judge.function=tests.judge_fns:length"],
     "prompts: required when model is not 'builtin'"),
    ("model without a judge", lambda f, o: [*RUN, f"model={f['model']}", f"prompts={f['prompts']}"],
     "judge: set judge.function="),
    ("wrong reward-model path", lambda f, o: [*RUN, "judge.kind=reward_model", f"judge.reward_model={f['dir'] / 'rm'}"],
     "judge.reward_model: {dir}/rm: no such file or directory"),
    ("causal LM as the reward model", lambda f, o: [*RUN, "judge.kind=reward_model", f"judge.reward_model={f['model']}"],
     "judge.reward_model: {model}: is a LlamaForCausalLM, not a sequence-classification reward model"),
    ("reward model without score weights",
     lambda f, o: [*RUN, "judge.kind=reward_model", f"judge.reward_model={f['relabelled_lm']}"],
     "judge.reward_model: {dir}/relabelled_lm: its checkpoint has no score.weight weights, which would be random"),
    ("reward model without a path", lambda f, o: [*RUN, "judge.kind=reward_model"], "judge.reward_model: required"),
    ("judge function spec", lambda f, o: [*RUN, "judge.function=length"], "is not of the form 'pkg.module:function'"),
    ("judge module missing", lambda f, o: [*RUN, "judge.function=no_such_module:fn"], "cannot import module"),
    ("judge function missing", lambda f, o: [*RUN, "judge.function=tests.judge_fns:nope"], "has no function 'nope'"),
    # Output directory.
    ("output dir under a file", lambda f, o: [*RUN, f"output_dir={f['a_file'] / 'run'}"], "output_dir: cannot create"),
    # selfalign train.
    ("train: damaged Parquet data", lambda f, o: ["train", str(train_recipe(f, o)), f"data.path={f['parquet']}"],
     "not a readable Parquet file"),
    ("train: missing field", lambda f, o: ["train", str(train_recipe(f, o)), f"data.path={f['no_rejected']}"],
     "no_rejected.jsonl line 2: missing field 'rejected'"),
    ("train: misspelt model", lambda f, o: ["train", str(train_recipe(f, o)), f"model={f['dir'] / 'modle'}"],
     "model: {dir}/modle: no such file or directory"),
    ("train: misspelt reference", lambda f, o: ["train", str(train_recipe(f, o)), f"reference={f['dir'] / 'ref'}"],
     "reference: {dir}/ref: no such file or directory"),
    ("train: messages without a chat template",
     lambda f, o: ["train", str(train_recipe(f, o)), f"model={f['no_template']}", f"data.path={f['messages_pairs']}"],
     "messages_pairs.jsonl line 1: the prompt is a list of chat messages but the tokenizer has no chat template"),
    ("train: eval fraction", lambda f, o: ["train", str(train_recipe(f, o)), "data.eval_fraction=1.5"],
     "data.eval_fraction: must be in [0, 1)"),
    ("train: no data", lambda f, o: ["train", str(train_recipe(f, o)), "data.path="], "data.path: required"),
    # selfalign eval.
    ("eval: not a policy or run", lambda f, o: ["eval", str(f["dir"])], "neither a policy directory"),
    ("eval: wrong reward-model path", lambda f, o: ["eval", str(f["model"]), f"--prompts={f['prompts']}",
                                                    f"--baseline={f['model']}", f"--reward-model={f['dir'] / 'rm'}"],
     "--reward-model: {dir}/rm: no such file or directory"),
    ("eval: causal LM as the reward model", lambda f, o: ["eval", str(f["model"]), f"--prompts={f['prompts']}",
                                                          f"--baseline={f['model']}", f"--reward-model={f['model']}"],
     "--reward-model: {model}: is a LlamaForCausalLM, not a sequence-classification reward model"),
    ("eval: missing baseline", lambda f, o: ["eval", str(f["model"]), f"--prompts={f['prompts']}",
                                             f"--baseline={f['dir'] / 'base'}", "--reward=tests.judge_fns:length"],
     "--baseline: {dir}/base: no such file or directory"),
    ("eval: missing reference", lambda f, o: ["eval", str(f["model"]), f"--prompts={f['prompts']}",
                                              f"--baseline={f['model']}", f"--reference={f['dir'] / 'ref'}",
                                              "--reward=tests.judge_fns:length"],
     "--reference: {dir}/ref: no such file or directory"),
    # selfalign compare.
    ("compare: output is a file", lambda f, o: ["compare", str(f["dir"]), "--output", str(f["a_file"])],
     "a_file: is a file, but compare writes compare.md and compare.png into a directory"),
]


@pytest.fixture
def out(tmp_path):
    """An output directory that already holds a file of the user's."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    return out


def check_refused(argv: list[str], out: Path, capsys, message: str) -> str:
    before = digest(out)
    code = main([*argv, "--no-progress"] if argv[0] in ("run", "train", "eval") else argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("selfalign: error: ") and "Traceback" not in err, err
    assert message in err, err
    assert digest(out) == before
    return err


@pytest.mark.parametrize("build, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_the_run_directory(files, out, builtin_task, capsys, build, message):
    argv = build(files, out)
    if argv[0] == "run" and not any(a.startswith("output_dir=") for a in argv):
        argv = [*argv, f"output_dir={out}"]
    check_refused(argv, out, capsys, message.replace("{dir}", str(files["dir"])).replace("{model}", str(files["model"])))


def test_the_battery_has_at_least_30_cases():
    assert len(CASES) >= 30


def test_debug_shows_the_traceback(out, builtin_task):
    with pytest.raises(ConfigError, match="did you mean 'iterations'"):
        main(["run", "quickstart", *TINY, "iteration=3", f"output_dir={out}", "--debug"])


def test_resume_with_a_changed_config_is_refused(files, out, builtin_task, capsys):
    argv = ["run", "quickstart", *TINY, f"output_dir={out}"]
    cfg = load_config(RunConfig, Path(__file__).parents[1] / "selfalign" / "recipes" / "quickstart.yaml", argv[2:])
    (out / "config.yaml").write_text(dump_yaml(cfg))
    check_refused([*argv, "train.beta=0.5"], out, capsys, "train.beta: 0.1 -> 0.5")


def test_resume_on_an_edited_prompt_file_is_refused(out, builtin_task, capsys):
    """A prompt file edited between a kill and the resume is refused as a changed config is: the run recorded what
    its data held (RUN/data.json). A run from before data.json existed is resumed on the file as it is now."""
    prompts = out.parent / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"sort : {a} {b} {c}"}) + "\n"
                               for a, b, c in [(3, 1, 2), (2, 3, 1), (1, 3, 2), (2, 1, 3)] * 2))
    argv = ["run", "quickstart", *TINY, f"output_dir={out}", f"prompts={prompts}"]
    assert main([*argv, "--no-progress"]) == 0
    recorded = json.loads((out / "data.json").read_text())
    assert recorded["prompts"]["rows"] == 8 and recorded["prompts"]["source"] == str(prompts)
    prompts.write_text(prompts.read_text().replace("sort : 2 3 1", "sort : 3 2 1", 1))
    check_refused(argv, out, capsys, f"the run started on other data (prompts {prompts}: 8 rows, sha256 "
                                     f"{recorded['prompts']['sha256'][:12]} -> 8 rows, sha256 ")
    (out / "data.json").unlink()  # as a run saved before runs recorded their data
    assert main([*argv, "--no-progress"]) == 0
    assert json.loads((out / "data.json").read_text())["prompts"]["sha256"] != recorded["prompts"]["sha256"]


def test_train_resume_on_edited_data_is_refused(files, out, capsys):
    """`selfalign train` records its data.path too; a resume on edited pairs is refused before any training."""
    pairs = out.parent / "pairs.jsonl"
    pairs.write_text(Path(files["pairs"]).read_text())
    recipe = train_recipe(files, out, data={"path": str(pairs)})
    assert main(["train", str(recipe), "--no-progress"]) == 0
    rows = pairs.read_text().splitlines()
    recorded = json.loads((out / "data.json").read_text())["data"]
    assert recorded["rows"] == len(rows) and recorded["source"] == str(pairs)
    shutil.rmtree(out / "policy")  # as if killed before the trained policy was renamed into place
    pairs.write_text("\n".join(rows[:-1]) + "\n")  # the last pair deleted
    check_refused(["train", str(recipe)], out, capsys,
                  f"data {pairs}: {len(rows)} rows, sha256 {recorded['sha256'][:12]} -> {len(rows) - 1} rows")


def test_train_resume_with_a_changed_config_and_a_finished_run_are_refused(files, out, capsys):
    recipe = train_recipe(files, out)
    (out / "config.yaml").write_text(dump_yaml(load_config(TrainRunConfig, recipe)))
    check_refused(["train", str(recipe), "train.beta=0.5"], out, capsys, "train.beta: 0.1 -> 0.5")
    (out / "policy").mkdir()
    check_refused(["train", str(recipe)], out, capsys, "policy already exists: this run finished")


@pytest.mark.parametrize("command", ["run", "train"])
def test_a_run_directory_owned_by_a_live_process_is_refused(files, out, builtin_task, capsys, command):
    """A lock naming a live process of this machine refuses a second run; once it is gone, the lock is stale."""
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = {"pid": owner.pid, "host": socket.gethostname(), "started": _start_time(owner.pid)}
        (out / "run.lock").write_text(json.dumps(lock) + "\n")
        argv = ["run", "quickstart", *TINY, f"output_dir={out}"] if command == "run" else \
            ["train", str(train_recipe(files, out))]
        check_refused(argv, out, capsys, f"is in use by another selfalign process (pid {owner.pid}")
    finally:
        owner.kill()
        owner.wait()
    # The owner is gone: its lock is stale and the next run takes it over (and removes it when done).
    from selfalign.rundir import RunLock

    with RunLock(out):
        assert json.loads((out / "run.lock").read_text())["pid"] != owner.pid
    assert not (out / "run.lock").exists()


# Runs `selfalign train` with every file it writes limited to LIMIT bytes (RLIMIT_FSIZE: a longer write fails with
# EFBIG, as on a file system whose largest file is smaller than the weights), SIGXFSZ ignored so the write fails
# instead of killing the process.
UNDER_FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
from selfalign.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("checkpoint_every, what", [(1, "a checkpoint"), (0, "the policy")])
def test_weights_too_large_to_write_are_one_line_and_the_run_resumes(files, out, checkpoint_every, what):
    """The weights (~0.5 MB) cannot be written, the small files can: one line naming the directory and the room the
    weights need, exit 2, no partial file left; with the limit lifted the same command resumes and finishes."""
    from tests.conftest import subprocess_env

    recipe = train_recipe(files, out, train={"batch_size": 8, "micro_batch_size": 8,
                                             "checkpoint_every": checkpoint_every})
    argv = ["train", str(recipe), "--no-progress"]
    done = subprocess.run([sys.executable, "-c", UNDER_FILE_SIZE_LIMIT, "200000", *argv], capture_output=True,
                          text=True, env=subprocess_env(), timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    where = out / "checkpoint" if checkpoint_every else out
    assert err.startswith(f"selfalign: error: File too large while writing {what} (about "), err
    assert f"free there): {where} (a file-size limit (ulimit -f" in err, err
    assert (out / "config.yaml").exists() and not (out / "policy").exists() and not (out / "run.lock").exists()
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.safetensors")) and not list(out.rglob("*.pt"))
    assert main(argv) == 0
    weights = (out / "policy" / "model.safetensors").stat().st_size
    number, unit = re.search(r"about ([0-9.]+) (KB|MB) needed", err).groups()
    need = float(number) * {"KB": 1e3, "MB": 1e6}[unit]
    # The policy's weights; a checkpoint's also hold AdamW's two moments of each.
    assert 0.9 * weights < need < 1.1 * weights if not checkpoint_every else need > 2.5 * weights, (need, weights)


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs (needs root and mount rights; skipped elsewhere)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_mid_run_is_one_line_and_keeps_what_was_written(files, full_disk, capsys):
    out = full_disk / "run"
    recipe = train_recipe(files, out, train={"batch_size": 8, "micro_batch_size": 8, "checkpoint_every": 1})
    shutil.move(recipe, full_disk.parent / "recipe.yaml")
    code = main(["train", str(full_disk.parent / "recipe.yaml"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "No space left on device" in err and "free some space" in err
    assert (out / "config.yaml").exists() and not list(out.rglob("*.tmp")) and not (out / "run.lock").exists()
