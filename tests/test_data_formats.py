"""Records recognised by their fields: kava's schema, TRL messages and prompt/completion, GSM8k raw;
in ``kava data validate``, training and evaluation; ``data.format`` forces one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config
from kava.cli import main
from kava.data import DataError, load_examples
from kava.data.formats import map_auto, map_messages, map_prompt_completion

Q = [
    "Tom has 3 bags of 4 apples. He eats 2. How many are left?",
    "A box holds 5 pens. How many pens are in 6 boxes?",
    "Sam had 20 dollars and spent 7. How much is left?",
]
RECORDS = {
    "kava": [
        {"question": Q[0], "steps": ["<<3*4=12>>", "<<12-2=10>>"], "answer": "10"},
        {"question": Q[1], "steps": ["<<5*6=30>>"], "answer": "30"},
        {"question": Q[2], "steps": ["<<20-7=13>>"], "answer": "13"},
    ],
    "messages": [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": Q[0]},
                {"role": "assistant", "content": "3*4 = 12 apples.\n12-2 = 10 left.\nThe answer is: 10"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": Q[1]},
                {"role": "assistant", "content": "5*6 = 30.\nThe answer is: 30"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": Q[2]},
                {"role": "assistant", "content": "20-7 = 13.\nthe answer is 13."},
            ]
        },
    ],
    "prompt_completion": [
        {"prompt": Q[0], "completion": "3*4 = 12 apples.\n12-2 = 10 left.\nThe answer is: 10"},
        {
            "prompt": [{"role": "user", "content": Q[1]}],
            "completion": [{"role": "assistant", "content": "5*6 = 30. The answer is: 30"}],
        },
        {"prompt": Q[2], "completion": "20-7=<<20-7=13>>13 dollars.\n#### 13"},
    ],
    "gsm8k": [
        {"question": Q[0], "answer": "He has 3*4=<<3*4=12>>12 apples.\nThen 12-2=<<12-2=10>>10.\n#### 10"},
        {"question": Q[1], "answer": "There are 5*6=<<5*6=30>>30 pens.\n#### 30"},
        {"question": Q[2], "answer": "He has 20-7=<<20-7=13>>13 left.\n#### 1,3"},
    ],
}
# What each file must read as: (question, steps, answer) of the first record, and the answers.
FIRST = {
    "kava": (Q[0], ("<<3*4=12>>", "<<12-2=10>>"), "10"),
    "messages": (Q[0], ("3*4 = 12 apples.", "12-2 = 10 left."), "10"),
    "prompt_completion": (Q[0], ("3*4 = 12 apples.", "12-2 = 10 left."), "10"),
    "gsm8k": (Q[0], ("<<3*4=12>>", "<<12-2=10>>"), "10"),
}
ANSWERS = {
    "kava": ["10", "30", "13"],
    "messages": ["10", "30", "13"],
    "prompt_completion": ["10", "30", "13"],
    "gsm8k": ["10", "30", "13"],
}


def _write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture()
def files(tmp_path) -> dict[str, Path]:
    return {name: _write(tmp_path / f"{name}.jsonl", recs) for name, recs in RECORDS.items()}


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_each_layout_is_recognised_by_its_fields(files, fmt):
    examples = load_examples(str(files[fmt]))
    ex = examples[0]
    assert (ex.question, ex.steps, ex.answer) == FIRST[fmt]
    assert [e.answer for e in examples] == ANSWERS[fmt]
    assert load_examples(str(files[fmt]), fmt=fmt) == examples  # forcing the layout it has changes nothing


def test_the_cot_is_the_text_before_the_answer_marker():
    got = map_messages(
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "two and two\nmake four\nThe answer is: 4."},
            ]
        }
    )
    assert got == {"question": "2+2?", "steps": ["two and two", "make four"], "answer": "4"}
    got = map_prompt_completion({"prompt": "q", "completion": "a <<2*3=6>> b <<6+1=7>> The answer is 7"})
    assert got == {"question": "q", "steps": ["<<2*3=6>>", "<<6+1=7>>"], "answer": "7"}
    with pytest.raises(DataError, match="no answer marker"):
        map_prompt_completion({"prompt": "q", "completion": "it is 7"})
    with pytest.raises(DataError, match="unknown record layout .*input, output"):
        map_auto({"input": "q", "output": "7"})


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_kava_data_validate_reads_each_layout(files, fmt, capsys):
    assert main(["data", "validate", str(files[fmt])]) == 0
    assert capsys.readouterr().out.strip() == f"{files[fmt]}: 3 records OK"


@pytest.mark.parametrize(
    "record,names",
    [
        ({"messages": [{"role": "user", "content": "2+2?"}]}, ["field 'messages'", "no 'assistant' message"]),
        ({"prompt": "2+2?", "completion": "four"}, ["field 'completion'", "no answer marker"]),
        ({"question": "2+2?", "answer": "four #### x"}, ["field 'answer'", "not a number"]),
        ({"input": "2+2?", "target": 4}, ["unknown record layout", "input, target"]),
    ],
)
def test_a_bad_record_is_one_line_naming_file_and_line(tmp_path, record, names, capsys):
    path = _write(tmp_path / "bad.jsonl", [RECORDS["kava"][0], record])
    assert main(["data", "validate", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}:2" in err, err
    for name in names:
        assert name in err, err


def test_data_format_forces_a_layout(files, tmp_path, capsys):
    assert main(["data", "validate", str(files["gsm8k"]), "--fmt", "kava"]) == 1  # the raw answer is not a number
    assert "gsm8k.jsonl:1: field 'answer': not a number" in capsys.readouterr().err
    assert main(["data", "validate", str(files["messages"]), "--fmt", "prompt_completion"]) == 1
    assert "messages.jsonl:1: field 'prompt': missing" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            tiny_config(
                data={"train": str(files["kava"]), "format": "chatml"}, train={"output_dir": str(tmp_path / "r")}
            ).to_dict()
        )
    )
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "data.format" in err and "chatml" in err and "Traceback" not in err


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_a_three_line_file_of_each_layout_trains_and_evaluates(files, tmp_path, fmt, capsys):
    cfg = tiny_config(
        data={"train": str(files[fmt]), "eval": str(files[fmt])},
        train={"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2, "eval_at_end": True},
        eval={"instruments": False},
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["train", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "finished: step 2/2" in out and "eval student:" in out and "n=3" in out
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["examples"] == 3
