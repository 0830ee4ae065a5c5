# kubetune — every target a user or CI needs. Heavy environments (torch, unsloth,
# Kubernetes binaries) live in a cache outside the clone: $(KUBETUNE_CACHE).
SHELL := /bin/bash
export KUBETUNE_CACHE ?= $(HOME)/.cache/kubetune
# The same path as hack/run-in-venv.sh: the packages, and hack/cluster for the localcluster package.
export PYTHONPATH := $(CURDIR)/operator:$(CURDIR)/trainer-images:$(CURDIR)/hack/cluster$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: test lint generate crds cluster-build cluster-up cluster-down demo bench images help

help:
	@echo "make demo           fine-tune SmolLM2-135M with LoRA on this machine (CPU, a few minutes)"
	@echo "make test           install what the tests need (cached) and run lint, types and every test tier"
	@echo "make generate       rewrite every generated file: crds/, the chart's crds/ and files/ (RBAC rules,"
	@echo "                    trainer status policy, job kinds), the chart README's values table, tests/unit/golden"
	@echo "make crds           the same as make generate (its old name)"
	@echo "make cluster-up     start the local control plane (etcd, apiserver, kwok, training-operator)"
	@echo "                    NODES=real: also a real kubelet node where pods run (root; see hack/cluster/README.md)"
	@echo "                    NODES=real-only: the real node alone, untainted (the end-to-end tier's cluster)"
	@echo "make cluster-down   stop it and remove its state"
	@echo "make bench          operator and trainer benchmarks -> bench/results/"
	@echo "make images         build the operator and trainer images (Docker, or buildah without a daemon)"

test:
	bash hack/test.sh

lint:
	bash hack/test.sh lint

# The CRDs and the chart's files/ come from `kubetune crds`; the golden files and the chart
# README's values table from the tests that check them, with their rewrite switches on (one
# renderer each, so what is written is what the unit tier compares).
generate:
	bash hack/run-in-venv.sh dev python -m kubetune crds
	KUBETUNE_UPDATE_GOLDEN=1 KUBETUNE_UPDATE_CHART=1 bash hack/run-in-venv.sh dev python -m pytest -q -p no:cacheprovider \
	  tests/unit/test_builders.py::test_golden tests/unit/test_helm.py::test_readme_values_table_is_current

crds: generate

cluster-build:
	bash hack/cluster/build.sh

# NODES=real: also the real node (kubelet + containerd); default NODES=kwok (fake nodes only);
# NODES=real-only: the real node alone, untainted, no kwok nodes.
cluster-up:
	NODES=$(NODES) bash hack/cluster/up.sh

cluster-down:
	bash hack/cluster/down.sh

demo:
	bash hack/demo.sh

bench:
	bash bench/run.sh

images:
	bash hack/images.sh
