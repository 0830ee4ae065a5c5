# kubetune — every target a user or CI needs. Heavy environments (torch, unsloth,
# Kubernetes binaries) live in a cache outside the clone: $(KUBETUNE_CACHE).
SHELL := /bin/bash
export KUBETUNE_CACHE ?= $(HOME)/.cache/kubetune
export PYTHONPATH := $(CURDIR)/operator:$(CURDIR)/trainer-images$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: test lint crds cluster-build cluster-up cluster-down demo bench images help

help:
	@echo "make demo           fine-tune SmolLM2-135M with LoRA on this machine (CPU, a few minutes)"
	@echo "make test           install what the tests need (cached) and run lint, types and every test tier"
	@echo "make crds           regenerate crds/ and helm/kubetune/crds/ from the pydantic models"
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

crds:
	bash hack/run-in-venv.sh dev python -m kubetune crds

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
