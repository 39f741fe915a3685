"""Every `Error:` line the commands can print, and the test that asserts it.

The contract (reshard/commandline.py's run_command is the one place that turns exceptions into lines): a known error
prints one line `Error: <message>` on stderr and exits 1; a `UsageError` (a bad option value or
input) exits 2, as do flags and values click rejects; Ctrl-C exits 130; anything unexpected prints
one line naming its type and RESHARD_DEBUG=1.

MESSAGES lists every message raised through the project's error types (reshard/errors.py) in
reshard/ and runtime/, written as its template (the literal text, `{}` for each interpolated
value), with the tests that assert its whole line (and the exit code where the CLI can reach
it). `test_every_raised_message_has_a_test` reads the sources and fails on a message missing
here: when you add a `raise SomeError(...)`, add a row naming the test that asserts its line.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MESSAGES: dict[str, tuple[str, ...]] = {
    "--draft cannot be combined with --prompt-lookup or --assistant; pick one": ("test_speculate.py::test_cli_draft_errors",),
    "--min-new-tokens cannot be combined with --draft; drop one": (
        "test_speculate.py::test_cli_draft_conflicts_are_one_error_line",),
    "cpu_layers must be a layer count (0 or more) or 'auto', not {}": ("test_hostcompute.py::test_bad_cpu_layers_is_refused",),
    "cpu_experts must be 'auto', 'on' or 'off', not {}": ("test_cpuexperts.py::test_bad_cpu_experts_is_refused",),
    "--cpu-experts {} is not understood; give auto, on or off": ("test_cpuexperts.py::test_cli_bad_cpu_experts_exits_2",),
    "tree speculation does not support sliding-window attention layers; generate without a draft": (
        "test_speculate.py::test_api_draft_refusals",),
    "--cpu-layers {} is not understood; give a layer count (e.g. 8) or auto": (
        "test_hostcompute.py::test_cli_bad_cpu_layers_exits_2",),
    "a streamer takes one sequence, not {}; stream one prompt at a time": ("test_speculate.py::test_api_draft_refusals",),
    "keeping each token's logits cannot be combined with a draft; drop one": (
        "test_speculate.py::test_batch_of_a_moe_target_and_generate_batch",),
    "min_new_tokens is not supported with a draft; drop it or generate without --draft": (
        "test_speculate.py::test_api_draft_refusals",),
    "draft {} uses a different tokenizer than the target; tree speculation needs a draft with the same tokenizer "
    "(for a different one, use --assistant)": ("test_speculate.py::test_cli_draft_errors",),
    "tree budget must be 1 or more, not {}": ("test_speculate.py::test_api_draft_refusals",),
    "tree budget must be a number of tokens (1 or more) or 'auto', not {}": ("test_speculate.py::test_api_draft_refusals",),
    # --- reshard convert: the source -------------------------------------------------------
    "{} does not exist; give a checkpoint folder, a .gguf file or a hub repo id":
        ("test_robustness.py::test_missing_source",),
    "{} is a file; give its folder, or a .gguf file": ("test_errors_convert.py::test_source_is_a_file",),
    "{} is not readable": ("test_robustness.py::test_unreadable_source_folder",),
    "{} has no config.json; it is not a Hugging Face checkpoint folder":
        ("test_errors_convert.py::test_source_without_config",),
    "{} holds no weights (model.safetensors, pytorch_model.bin or their .index.json); point SOURCE at a "
    "checkpoint folder, a .gguf file or a hub repo id": ("test_robustness.py::test_folder_without_weights",),
    "{} is not a valid shard index ({})": ("test_errors_convert.py::test_shard_index_that_is_not_json",),
    "{} points outside {} ({}); refusing to read it":
        ("test_robustness.py::test_shard_index_pointing_outside_is_refused",),
    "{} names {}, which is missing from {}": ("test_errors_convert.py::test_shard_index_naming_a_missing_shard",),
    "{} is not a readable safetensors file ({}); download it again":
        ("test_robustness.py::test_unreadable_weights_file", "test_errors_convert.py::test_damaged_safetensors_source"),
    "{} is truncated at tensor {}; download it again":
        ("test_errors_convert.py::test_source_truncated_while_converting",),
    "{} cannot be read safely as weights ({})": ("test_robustness.py::test_malicious_bin_is_refused_and_nothing_runs",),
    "{}: transformers cannot read this GGUF file ({})":
        ("test_errors_convert.py::test_gguf_that_transformers_cannot_read",),
    "{} is part {} of a {}-file GGUF, but {} {} missing from {}":
        ("test_gguf.py::test_split_gguf_with_a_missing_part_is_refused",),
    "{} is not a readable GGUF file ({}); download it again": ("test_gguf.py::test_gguf_that_is_not_gguf",),
    "{} holds {} GGUF models{}: {}; name one as {}:TAG (e.g. {}:Q4_K_M)":
        ("test_hub_gguf.py::test_an_ambiguous_or_unknown_tag_is_one_line",),
    "{} has no GGUF file tagged {}; it has: {}": ("test_hub_gguf.py::test_an_ambiguous_or_unknown_tag_is_one_line",),
    "{} needs at least {} for this GGUF's conversion but its disk has {} free besides the download; free some "
    "space or choose an OUT on another disk":
        ("test_hub_gguf.py::test_a_download_outs_disk_could_not_convert_is_refused_before_it_starts",),
    "{} has no .gguf files (asked for {}:{})": ("test_hub_gguf.py::test_a_tag_on_a_repo_without_gguf_files_is_one_line",),
    "{} is a deepseek2 GGUF with expert_gating_func {}, which reshard cannot read yet; convert the model's "
    "safetensors checkpoint instead":
        ("test_formats_gguf_tables.py::test_deepseek2_file_with_an_unknown_routing_is_one_line",),
    "{}: its rope_freqs are not Llama 3's scaling with factor {}; convert the model's safetensors checkpoint instead":
        ("test_formats_gguf_decoders.py::test_a_file_transformers_cannot_hold_is_one_line",),
    "{} is a hunyuan-moe GGUF with experts {} wide and {} shared expert(s), which transformers' HunYuan model cannot "
    "hold; convert the model's safetensors checkpoint instead":
        ("test_formats_gguf_decoders.py::test_a_file_transformers_cannot_hold_is_one_line",),
    "{} is a {} GGUF with a per-layer key/value head count, which reshard cannot read yet; convert the model's "
    "safetensors checkpoint instead": ("test_formats_gguf_decoders.py::test_a_file_transformers_cannot_hold_is_one_line",),
    "{} is a cohere2 GGUF whose rotary embedding covers part of each head, which transformers' Cohere2 model does "
    "not; convert the model's safetensors checkpoint instead":
        ("test_formats_gguf_decoders.py::test_a_file_transformers_cannot_hold_is_one_line",),
    "{} is a jamba GGUF whose layers {} do not repeat with one period, as transformers' Jamba places them; convert "
    "the model's safetensors checkpoint instead":
        ("test_formats_gguf_decoders.py::test_a_file_transformers_cannot_hold_is_one_line",),
    "{} is a {} GGUF without {}.{}; download it again":
        ("test_formats_gguf_tables.py::test_deepseek2_file_missing_a_size_is_one_line",),
    "{} has shape {}, not [heads, kv_lora_rank, qk_nope_head_dim]; is the file's metadata the one of these weights?":
        ("test_formats_gguf_tables.py::test_k_b_that_does_not_match_the_metadata_is_one_line",),
    "GGUF files and the GGML blocks they hold need the gguf package ({} is not installed): pip install 'reshard[gguf]'":
        ("test_gguf.py::test_gguf_without_the_gguf_package_is_one_line",),
    "{}: the source's {} blocks {} do not make a weight of shape {}; the checkpoint does not match its config":
        ("test_formats_gguf.py::test_blocks_that_do_not_fit_the_config",),
    "{} is truncated in tensor {}; download it again": ("test_gguf.py::test_gguf_shrunk_while_converting",),
    "{}: transformers' GGUF processing gave no tensor for {}":
        ("test_gguf.py::test_gguf_processing_that_gives_no_tensor",),
    "{} ends before byte {}; was it changed during the conversion?":
        ("test_fileio.py::test_source_shrunk_before_its_tensors_are_copied",),
    "{} needs its own Python code to load; pass --trust-remote-code if you trust it":
        ("test_robustness.py::test_custom_code_needs_trust_remote_code",
         "test_errors.py::test_runtime_folder_with_custom_code_needs_trust_remote_code"),
    # published quantized checkpoints (reshard/published.py, reshard/gptq.py)
    "{} is quantized with {}, which reshard cannot read; {}":
        ("test_formats_gptq.py::test_unreadable_quantization_is_refused_before_any_weight_download",),
    "{} is {}, which reshard cannot read; {}":
        ("test_formats_gptq.py::test_unreadable_quantization_is_refused_before_any_weight_download",),
    "{} is compressed-tensors in the {} format, which reshard cannot read; {}":
        ("test_formats_gptq.py::test_unreadable_quantization_is_refused_before_any_weight_download",),
    "{}.g_idx does not give each group {} columns; this cannot be re-packed exactly: convert with --dtype "
    "float16 (or bfloat16) to de-quantize it": (
        "test_formats_gptq.py::test_gptq_whose_groups_are_uneven_is_refused_unless_dequantized",),
    "{} and the weights transformers stacks with it are not all in act-order (or all not); convert with --dtype "
    "float16 (or bfloat16) to de-quantize": (
        "test_formats_gptq_moe.py::test_act_order_experts_are_stored_in_group_order_and_equal_the_published_"
        "dequantization",),
    "{} and the weights transformers concatenates with it have different act-orders; convert with --dtype "
    "float16 (or bfloat16) to de-quantize them": (
        "test_formats_gptq_moe.py::test_act_order_experts_are_stored_in_group_order_and_equal_the_published_"
        "dequantization",),
    "{} is a packed {} weight that transformers combines with others at load; convert with --dtype float16 (or "
    "bfloat16) to de-quantize it": ("test_formats_gptq.py::test_packed_expert_weights_are_refused_unless_dequantized",),
    "transformers cannot read the config of {}: {}": ("test_robustness.py::test_config_transformers_cannot_load",),
    "this model needs its own code; pass --trust-remote-code if you trust it ({})":
        ("test_errors_convert.py::test_model_code_that_needs_trust_remote_code",),
    "transformers cannot build a causal language model for model type {}: {}":
        ("test_robustness.py::test_not_a_decoder_only_causal_lm",),
    "{} is made from {} tensors that transformers transposes at load, which their packing does not allow; "
    "de-quantize the checkpoint with --dtype bfloat16": (
        "test_multimodal.py::test_llama4_experts_one_linear_each_in_nvfp4_are_one_line",),
    "{} line {} is not '<base64 token> <rank>'; download it again": (
        "test_tiktoken.py::test_vocabulary_problems_are_one_line",),
    "{} gives {} the id {}, not the one after the {} tokens of {} and the special tokens before it": (
        "test_tiktoken.py::test_vocabulary_problems_are_one_line",),
    "model type {} is a vision-language model whose language model ({}) transformers has no causal LM for; "
    "reshard cannot convert it yet": ("test_multimodal.py::test_a_language_model_transformers_has_no_causal_lm_for_is_one_line",),
    "model type {} is an encoder-decoder model; only decoder-only causal LMs can be converted":
        ("test_robustness.py::test_not_a_decoder_only_causal_lm",),
    "model type {} is an encoder (is_decoder is false, no causal attention); only decoder-only causal LMs can be "
    "converted": ("test_robustness.py::test_not_a_decoder_only_causal_lm",),
    "{} has no list of {} decoder layers; only decoder-only models whose layers sit in one ModuleList can be "
    "streamed": ("test_errors_convert.py::test_model_without_a_list_of_layers",),
    "transformers' conversion of {} and {} more tensor(s) into {} failed ({}: {}); is the config the one of these "
    "weights?": ("test_errors_convert.py::test_expert_conversion_that_transformers_cannot_do",),
    "transformers' conversion into {} also makes {}, which is not a parameter of group {}; this checkpoint cannot "
    "be converted": ("test_errors_convert.py::test_expert_conversion_that_makes_an_unplanned_tensor",),
    "the checkpoint lacks {} tensor(s) the model needs, e.g. {}; is the config the one of these weights?":
        ("test_robustness.py::test_missing_unexpected_or_misshapen_tensor",),
    "the checkpoint has {} tensor(s) the model does not use, e.g. {}; is the config the one of these weights?":
        ("test_robustness.py::test_missing_unexpected_or_misshapen_tensor",),
    "tensor {} has shape {} but the config needs {}; is the config the one of these weights?":
        ("test_robustness.py::test_missing_unexpected_or_misshapen_tensor",
         "test_errors_convert.py::test_tensor_whose_read_shape_differs"),
    "{} is ModelOpt {}, which reshard cannot read; {}":
        ("test_formats_gptq.py::test_unreadable_quantization_is_refused_before_any_weight_download",),
    "{} is 8-bit bitsandbytes (LLM.int8), which reshard cannot read; {}":
        ("test_formats_gptq.py::test_unreadable_quantization_is_refused_before_any_weight_download",),
    "{} is an MXFP4 weight whose codes {} and scales {} do not make one (out, in) weight in blocks of 32; is the "
    "config the one of these weights?": ("test_formats_mxfp4.py::test_compressed_tensors_mxfp4_scales_that_do_not_fit_are_one_line",),
    # published NVFP4 checkpoints (reshard/nvfp4.py)
    "{} is an NVFP4 weight whose parts have shapes {}, {} and {}, which do not make one (out, in) weight in groups "
    "of {}; is the config the one of these weights?": ("test_formats_nvfp4.py::test_parts_that_make_no_weight_are_one_line",),
    # published bitsandbytes 4-bit checkpoints (reshard/bnb.py)
    "{} is a 4-bit bitsandbytes weight of shape {} (dtype {}, {} blocks) that reshard cannot keep; convert with "
    "--dtype float16 (or bfloat16) to de-quantize it": ("test_formats_bnb.py::test_a_state_reshard_cannot_keep_is_one_line",),
    "{} is a 4-bit bitsandbytes weight that transformers combines with others at load; convert with --dtype float16 "
    "(or bfloat16) to de-quantize it": ("test_formats_bnb.py::test_per_expert_4bit_weights_are_refused_unless_dequantized",),
    # published fp8 checkpoints (reshard/fp8.py)
    "fp8 weight {} has shape {}, which its scale grid {} does not divide; is the config the one of these weights?":
        ("test_formats_fp8.py::test_scale_grid_that_does_not_divide_its_weight",),
    "{} is made from {} tensors and unquantized ones such as {}, so it cannot be kept in {}; de-quantize the checkpoint "
    "with --dtype bfloat16": ("test_formats_fp8.py::test_experts_of_fp8_and_unquantized_tensors_are_not_kept_in_fp8",
                              "test_formats_nvfp4.py::test_experts_of_nvfp4_and_unquantized_tensors_are_one_line"),
    # --- reshard convert: options, the output folder, the disk -------------------------------
    "unknown dtype {}; use auto, float16, bfloat16 or float32":
        ("test_robustness.py::test_unknown_device_or_dtype",
         "test_errors_convert.py::test_library_rejects_unknown_dtype_quantization_and_tensor_dtype"),
    "unknown quantization {}; use int8 or int4":
        ("test_errors_convert.py::test_library_rejects_unknown_dtype_quantization_and_tensor_dtype",),
    "--quantize-group must be an even number of 2 or more, not {}": ("test_quant.py::test_cli_bad_quantize_flags",),
    "--quantize-group and --quantize-embeddings need --quantize int8 or int4":
        ("test_quant.py::test_cli_bad_quantize_flags",),
    "--quantize-group applies to int4 only; int8 has one scale per output channel":
        ("test_quant.py::test_cli_bad_quantize_flags",),
    "--low-disk is for hub repo ids; {} is a local path, convert it without --low-disk":
        ("test_robustness.py::test_low_disk_needs_a_hub_source",),
    "{} needs about {} more but its disk has {} free; free some space or choose an OUT on another disk (for hub "
    "sources, --low-disk keeps only one source shard)":
        ("test_robustness.py::test_not_enough_free_disk_is_refused_before_writing",
         "test_checks_first.py::test_hub_download_that_does_not_fit_is_refused_before_downloading"),
    "{} needs about {} more but its disk has {} free; free some space or choose an OUT on another disk":
        ("test_errors_convert.py::test_low_disk_conversion_that_does_not_fit",),
    "the hub cache {} needs about {} for the download but its disk has {} free; free some space, set HF_HUB_CACHE "
    "to a folder on another disk, or convert with --low-disk":
        ("test_checks_first.py::test_hub_cache_on_another_disk_is_checked_for_the_download",),
    "{} is a file; OUT must be a folder": ("test_errors_convert.py::test_out_that_is_a_file",),
    "{} is not empty and holds no conversion record; choose an empty folder, or pass --force to write into it "
    "anyway": ("test_robustness.py::test_non_empty_foreign_out_is_refused",),
    "{} holds a damaged conversion record ({}); pass --force to convert into it afresh":
        ("test_errors_convert.py::test_out_with_a_damaged_conversion_record",),
    "{} holds a conversion of {}, not of {}; choose another folder, or pass --force to replace it":
        ("test_robustness.py::test_out_holding_another_model_is_refused_unless_force",
         "test_robustness.py::test_other_dtype_or_format_version_is_refused"),
    "tensor {} has dtype {}, which the format cannot store":
        ("test_errors_convert.py::test_library_rejects_unknown_dtype_quantization_and_tensor_dtype",),
    # --- the hub ---------------------------------------------------------------------------
    "{} is gated: accept its terms at {}, then pass --token or set HF_TOKEN": ("test_hub.py::test_gated_repo",),
    "{} is neither a local path nor a repo on {} that you can see (check the name; a private repo needs --token or "
    "HF_TOKEN)": ("test_hub.py::test_repo_not_found",),
    "{} on {} has no revision {}; pass an existing branch, tag or commit to --revision":
        ("test_hub.py::test_revision_not_found",),
    "cannot fetch {}: HF_HUB_OFFLINE is set; unset it to download, or use a local folder or .gguf file":
        ("test_hub.py::test_unreachable_hub_from_the_command_line",),
    "cannot reach the hub at {} to fetch {} ({}); check {}, {}":
        ("test_hub.py::test_download_connection_error", "test_hub.py::test_unreachable_hub_from_the_command_line"),
    "the hub at {} answered HTTP {} for {}; run the same command again later, or check the name and HF_TOKEN":
        ("test_hub.py::test_hub_outage_names_the_status",),
    "{} has no config.json at its top level; it is not a transformers checkpoint":
        ("test_errors_convert.py::test_hub_repo_without_config",),
    "the repo has no model.safetensors or pytorch_model.bin weights at its top level":
        ("test_errors_convert.py::test_hub_repo_without_weights",),
    "{} of {} is not a valid shard index ({})": ("test_errors_convert.py::test_low_disk_shard_index_that_is_not_json",),
    "{} of {} names {}, which is not a top-level weight file of the repo; refusing to fetch it":
        ("test_errors_convert.py::test_low_disk_shard_index_naming_another_file",),
    # --- a converted folder: the manifest ---------------------------------------------------
    "the conversion into {} did not finish; run the same `reshard convert` command again to resume it":
        ("test_robustness.py::test_interrupted_output_tells_runtime_to_resume",),
    "{} holds no {}; create it with `reshard convert SOURCE {}`":
        ("test_verify.py::test_verify_of_a_folder_without_manifest",),
    "{} is not a {} manifest": ("test_errors_convert.py::test_manifest_of_another_format",),
    "{} has format version {}, this version reads {}; convert the model again with this version's `reshard "
    "convert`": ("test_errors_convert.py::test_manifest_of_another_format_version",),
    "{} is damaged ({}); run `reshard convert` again": ("test_errors_convert.py::test_damaged_manifest",),
    "{}: group {} has quantized tensors but the quantization scheme is {}":
        ("test_errors_convert.py::test_quantized_groups_without_a_scheme",),
    "{}: {} is stored as {}, which this version of reshard does not read; update reshard, or convert the model "
    "again with this version": ("test_errors_convert.py::test_quantized_in_a_scheme_this_version_does_not_read",),
    "{}: expert tensor {} of group {} is not [{}, ...]; run `reshard convert` again":
        ("test_errors_convert.py::test_expert_tensor_of_the_wrong_size",),
    "{}: quantized {} lacks {}; run `reshard convert` again":
        ("test_errors_convert.py::test_quantized_tensor_without_its_scales",),
    # --- a converted folder: layer files (CorruptFileError: "<path>: <problem>; run `reshard convert` again
    # to repair it"; a source's safetensors file quotes the same problems) ------------------------
    "file is missing": ("test_verify.py::test_generate_stops_on_a_missing_file",),
    "size is {} bytes, manifest says {}": ("test_verify.py::test_generate_stops_on_a_truncated_file",),
    "size is {} bytes, header describes {}":
        ("test_errors_convert.py::test_layer_file_whose_header_describes_another_size",
         "test_errors_convert.py::test_damaged_safetensors_source"),
    "file is truncated (no header)": ("test_errors_convert.py::test_damaged_safetensors_source",),
    "header length is out of range": ("test_robustness.py::test_unreadable_weights_file",),
    "header is not valid JSON": ("test_errors_convert.py::test_damaged_safetensors_source",),
    "header entry {} is malformed": ("test_errors_convert.py::test_damaged_safetensors_source",),
    "tensors differ from the manifest (missing {}, extra {})":
        ("test_errors_convert.py::test_layer_file_whose_tensors_differ",),
    "tensor {} is {}{}, manifest says {}{}": ("test_errors_convert.py::test_layer_file_whose_tensor_shape_differs",),
    "checksum differs from the manifest (the file is damaged)":
        ("test_verify.py::test_generate_verify_stops_on_a_bit_flip",),
    "<reshard/verify.py:verify_folder>":  # the first bad file's problem, and how many more are bad
        ("test_errors_convert.py::test_runtime_names_the_first_damaged_file_and_counts_the_rest",),
    "{} of {} layer files in {} are damaged or missing; run `reshard convert` again to repair them":
        ("test_verify.py::test_verify_names_each_truncated_or_bit_flipped_file",),
    # --- runtime: options ------------------------------------------------------------------
    "unknown device {}; use cpu, cuda or cuda:N": ("test_robustness.py::test_unknown_device_or_dtype",),
    "device '{}' is not supported; use cpu, cuda or cuda:N": ("test_robustness.py::test_unknown_device_or_dtype",),
    "device '{}' asked for, but torch sees no CUDA GPU; use --device cpu (or leave it out)":
        ("test_errors_runtime.py::test_cuda_asked_for_without_cuda",
         "test_first_hour.py::test_no_gpu_error_is_worded_for_the_command_line"),
    "prefetch must be 0 or more, not {}": ("test_errors_runtime.py::test_library_checks_of_values_the_cli_rejects_first",),
    "memory size {} is not understood; write e.g. 12GiB, 500MB or a byte count":
        ("test_budget.py::test_cli_budget_flags_and_stats",),
    # MemoryBudgetError (runtime.budget.too_small): "streaming this model with <job> needs <X>GiB of device
    # memory (...), but <what there is>; use --max-gpu-memory <X>GiB or more | free device memory (...)";
    # the CLI line (exit 1) is asserted on a GPU in test_budget_cuda.py
    "<runtime/opening.py:place_groups>": ("test_planner.py::test_too_small_names_the_least_budget_that_works",
                                          "test_budget_cuda.py::test_too_small_budget_is_one_error_naming_what_works"),
    "ends before byte {}": ("test_moe.py::test_an_expert_read_that_comes_back_short_names_the_file",),
    "<runtime/jobmemory.py:fit_job>": ("test_degrade.py::test_scoring_that_cannot_fit_names_the_budget_that_would",),
    # --- runtime generate ------------------------------------------------------------------
    "empty prompt; pass --prompt TEXT or text on stdin": ("test_errors_runtime.py::test_empty_prompt",),
    "this folder has no tokenizer files; convert a checkpoint that has them":
        ("test_errors_runtime.py::test_folder_without_tokenizer",),
    "this tokenizer has no chat template; drop --chat": ("test_errors_runtime.py::test_chat_without_a_chat_template",),
    "prompt plus --max-new-tokens is {} tokens, more than the model's context of {}; shorten the prompt or lower "
    "--max-new-tokens": ("test_robustness.py::test_prompt_longer_than_the_context",),
    "--prompt-lookup and --assistant cannot be combined; pick one": ("test_batch.py::test_cli_assistant_errors",),
    "--prompt and --prompts-file cannot be combined; pick one": ("test_cli.py::test_bad_combinations_exit_2_before_loading",),
    "--min-new-tokens ({}) is more than --max-new-tokens ({}); lower it or raise --max-new-tokens":
        ("test_cli.py::test_bad_combinations_exit_2_before_loading",),
    "--top-p needs --temperature above 0 (0 is greedy)": ("test_cli.py::test_bad_combinations_exit_2_before_loading",),
    "--prompt-lookup and --assistant work on one prompt at a time; drop --prompts-file":
        ("test_batch.py::test_cli_prompts_file_text_lines_and_errors",),
    "assistant {} is neither a converted folder nor a transformers checkpoint folder":
        ("test_batch.py::test_cli_assistant_errors",),
    "assistant {} lacks weights for {}; convert it again": ("test_errors_runtime.py::test_assistant_folder_missing_weights",),
    "{} holds no prompts": ("test_errors_runtime.py::test_bad_prompts_file",),
    '{} line {} has no "prompt" string': ("test_errors_runtime.py::test_bad_prompts_file",),
    "{} line {} is not valid JSON ({})": ("test_errors_runtime.py::test_bad_prompts_file",),
    # --- runtime score ---------------------------------------------------------------------
    "batch size must be 1 or more, not {}": ("test_errors_runtime.py::test_library_checks_of_values_the_cli_rejects_first",),
    "item {} is not a JSON object": ("test_errors_runtime.py::test_bad_score_items",),
    'item {}: "text" must be a string': ("test_errors_runtime.py::test_bad_score_items",),
    'item {} needs "prompt" (a string) and "choices" (a list of strings), or "text" (a string)':
        ("test_score.py::test_cli_score_bad_lines",),
    "item {} is {} tokens, more than the model's context of {}; shorten it":
        ("test_errors_runtime.py::test_bad_score_items", "test_score.py::test_item_longer_than_the_context"),
    # --- runtime over Ray Data (runtime/distributed.py) -------------------------------------------
    "--ray-workers needs --prompts-file (one prompt runs on one model)":
        ("test_distributed.py::test_ray_workers_need_a_prompts_file",),
    "--ray-workers needs Ray Data; install it with `pip install 'reshard[ray]'`":
        ("test_distributed.py::test_without_ray_the_flag_says_what_to_install",),
    'every item needs a "prompt" string': ("test_errors_runtime.py::test_library_checks_of_values_the_cli_rejects_first",),
    "--ray-workers must be 1 or more, not {}": ("test_errors_runtime.py::test_library_checks_of_values_the_cli_rejects_first",),
    "--ray-block-size must be 1 or more, not {}":
        ("test_errors_runtime.py::test_library_checks_of_values_the_cli_rejects_first",),
    # --- runtime serve (runtime/server.py, engine.py, sampling.py: HTTP errors, or lines of the CLI) ---
    "runtime serve needs {}; install it with: pip install 'reshard[serve]'":
        ("test_errors_serve.py::test_serve_without_its_extra",),
    "cannot listen on {}:{} ({}); pick another --host or --port":
        ("test_serve.py::test_cli_serve_on_a_busy_port_is_one_error_line", "test_errors_serve.py::test_busy_port"),
    "max_batch must be 1 or more and max_queue 0 or more, not {} and {}": ("test_errors_serve.py::test_engine_refusals",),
    "the prompt is empty": ("test_errors_serve.py::test_engine_refusals",),
    "this model's context is {} tokens, but the prompt has {} and max_tokens asks for {} more; shorten the prompt "
    "or lower max_tokens": ("test_errors_serve.py::test_engine_refusals",),
    "the server is shutting down": ("test_errors_serve.py::test_engine_refusals",),
    "all {} slots are busy and {} requests wait already; retry later":
        ("test_serve.py::test_full_queue_gets_429_and_recovers", "test_errors_serve.py::test_engine_refusals"),
    "max_tokens must be 1 or more, not {}": ("test_errors_serve.py::test_sampling_values_out_of_range",),
    "temperature must be between 0 and 2, not {}": ("test_errors_serve.py::test_sampling_values_out_of_range",),
    "top_p must be above 0 and at most 1, not {}": ("test_errors_serve.py::test_sampling_values_out_of_range",),
    "stop strings must not be empty": ("test_errors_serve.py::test_sampling_values_out_of_range",),
    # --- runtime chat and runtime eval (the lm-eval backend) --------------------------------
    "the conversation plus --max-new-tokens is {} tokens, more than the model's context of {}; /reset to start "
    "again or lower --max-new-tokens":
        ("test_chat.py::test_too_long_a_conversation_is_refused_and_the_chat_goes_on",),
    "this folder's tokenizer has no chat template; `runtime chat` needs one (use `runtime generate` for plain "
    "text)": ("test_chat.py::test_chat_needs_a_chat_template",),
    "lm-eval is not installed; pip install 'reshard[eval]'": ("test_lm_eval.py::test_eval_without_lm_eval_installed",),
    "{} must be a whole number{}, not {}": ("test_lm_eval.py::test_bad_model_args_are_one_error_line",
                                            "test_lm_eval.py::test_max_batch_size_caps_the_batches"),
    "{} must be 1 or more, not {}": ("test_lm_eval.py::test_bad_model_args_are_one_error_line",
                                     "test_lm_eval.py::test_max_batch_size_caps_the_batches"),
    "a continuation of {} tokens is longer than max_length {}":
        ("test_lm_eval.py::test_pairs_longer_than_max_length_are_cut_on_the_left",),
    "unknown model_args for the reshard backend: {}; see `runtime eval --help`":
        ("test_lm_eval.py::test_bad_model_args_are_one_error_line",),
    "{} has no tokenizer files; convert a checkpoint that has them":
        ("test_lm_eval.py::test_folder_without_a_tokenizer_is_refused",),
    "the prompt encodes to no tokens (only whitespace?); pass some text":
        ("test_errors.py::test_prompt_of_no_tokens_is_a_usage_error",),
    "{} line {}: the prompt encodes to no tokens (only whitespace?); pass some text":
        ("test_errors.py::test_prompt_of_no_tokens_is_a_usage_error",),
}

# Messages raised in code that landed without a test of its line yet: listed, so the gap is visible
# and the check below still catches the next untested message. Move a row to MESSAGES with its test.
PENDING: dict[str, str] = {}

# Lines the CLI's error boundary writes itself (not raised as the project's errors).
CLI_LINES: dict[str, tuple[str, ...]] = {
    "interrupted; run the same command again to resume (exit 130, reshard)":
        ("test_errors.py::test_interrupted_convert_exits_130_and_resumes",),
    "Error: interrupted (exit 130, runtime: nothing to resume)":
        ("test_cli.py::test_interrupt_exits_130", "test_errors.py::test_interrupted_generate_exits_130"),
    "no space left on device ({}); free some space and run the same command again to resume":
        ("test_robustness.py::test_full_disk_mid_way_leaves_nothing_taken_for_finished",),
    "{strerror}: {filename} (a file the command was given is missing or unreadable)":
        ("test_errors.py::test_missing_input_file",),
    "{type}: {first line} (set RESHARD_DEBUG=1 for the traceback)": ("test_errors.py::test_unexpected_error",),
    "click's own message for a bad flag or value (exit 2)":
        ("test_robustness.py::test_bad_flags_are_usage_errors", "test_cli.py::test_bad_values_exit_2_before_loading"),
}


# --- reading the raised messages from the sources ------------------------------------------

def _sources() -> list[Path]:
    return sorted([*ROOT.glob("reshard/**/*.py"), *ROOT.glob("runtime/**/*.py")])


def error_types() -> set[str]:
    """Names of the project's error classes: ReshardError and every subclass defined anywhere."""
    names, classes = {"ReshardError"}, []
    for path in _sources():
        classes += [c for c in ast.walk(ast.parse(path.read_text())) if isinstance(c, ast.ClassDef)]
    while True:
        more = {c.name for c in classes if any(getattr(b, "id", getattr(b, "attr", None)) in names for b in c.bases)}
        if more <= names:
            return names
        names |= more


def template(node, scope: dict) -> list[str]:
    """The message templates an expression can produce: literal text with `{}` for each value.
    `scope` holds the module's functions and the enclosing function's simple assignments: a
    call to such a function gives the templates it returns, a name the text assigned to it."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return ["".join(v.value if isinstance(v, ast.Constant) else _value(v, scope) for v in node.values)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):  # "text" + (" more" if x else "")
        left, right = template(node.left, scope), template(node.right, scope)
        if left or right:
            return [a + b for a in left or ["{}"] for b in right or ["{}"]]
    if isinstance(node, ast.Name) and isinstance(scope.get(node.id), ast.expr):
        return template(scope[node.id], scope)
    if isinstance(node, ast.Call) and isinstance(scope.get(getattr(node.func, "id", None)), ast.FunctionDef):
        function = scope[node.func.id]
        returns = [r.value for r in ast.walk(function) if isinstance(r, ast.Return) and r.value]
        return [t for r in returns for t in template(r, {**scope, **assignments(function)})]
    return []


def _value(v: ast.FormattedValue, scope: dict) -> str:
    """`{name}` in an f-string: the text assigned to `name` where it is plain, else `{}`."""
    if isinstance(v.value, ast.Name) and v.conversion == -1 and v.format_spec is None:
        return (template(v.value, scope) or ["{}"])[0]
    return "{}"


def assignments(function, before: float = float("inf")) -> dict:
    """{name: value} of a function's plain `name = value` statements, the last before line `before`."""
    found = sorted((a.lineno, t.id, a.value) for a in ast.walk(function) if isinstance(a, ast.Assign)
                   for t in a.targets if isinstance(t, ast.Name) and a.lineno < before)
    return {name: value for _, name, value in found}


def error_calls(tree, types: set[str]):
    """(call, enclosing function or None) for every construction of a project error in a module."""
    functions = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)]
    owner = {child: f for f in functions for child in ast.walk(f)}  # the innermost function last
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in types:
            yield node, owner.get(node)


def raised_messages() -> dict[str, list[str]]:
    """{template: ["path:line", ...]} for every project error constructed (raised, or returned to be
    raised) in reshard/ and runtime/: the `cli=` text where it has one (what the CLI prints), else
    its message. A message that is not literal text is keyed by `<path:function>`."""
    types, found = error_types(), {}
    for path in _sources():
        tree = ast.parse(path.read_text())
        functions = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
        rel = path.relative_to(ROOT).as_posix()
        for call, function in error_calls(tree, types):
            scope = {**functions, **(assignments(function, call.lineno) if function else {})}
            cli = [k.value for k in call.keywords if k.arg == "cli"]
            templates = next((t for t in (template(a, scope) for a in cli + call.args) if t), None)
            for t in templates or [f"<{rel}:{function.name if function else '<module>'}>"]:
                found.setdefault(t, []).append(f"{rel}:{call.lineno}")
    return {t: sorted(set(sites)) for t, sites in found.items()}


def joined_test_text(name: str) -> str:
    """A test module's text with adjacent string literals across lines joined, so a message split
    over several lines of a test reads as one."""
    text = (ROOT / "tests" / name).read_text()
    return re.sub(r"""(["'])\s*\n\s*[rbfRBF]*(["'])""", "", text)


def test_every_raised_message_has_a_test():
    missing = {t: sites for t, sites in raised_messages().items() if t not in MESSAGES and t not in PENDING}
    assert not missing, ("these messages have no row in MESSAGES (tests/test_errors.py); add each with the test "
                         "that asserts its whole `Error:` line and exit code:\n"
                         + "\n".join(f"  {t!r}  raised at {', '.join(s)}" for t, s in missing.items()))


def test_every_listed_message_is_still_raised():
    gone = sorted((set(MESSAGES) | set(PENDING)) - set(raised_messages()))
    assert not gone, f"MESSAGES lists messages no code raises any more; remove or update their rows: {gone}"


@pytest.mark.parametrize("table", [MESSAGES, CLI_LINES], ids=["MESSAGES", "CLI_LINES"])
def test_each_listed_test_exists_and_quotes_its_message(table):
    problems = []
    for message, tests in table.items():
        quoted = False
        for test in tests:
            module, name = test.split("::")
            text = joined_test_text(module)
            if not re.search(rf"^def {name}\(", text, re.M):
                problems.append(f"{test} does not exist")
            longest = max(re.split(r"\{[^}]*\}|<[^>]*>|\([^)]*\)$", message), key=len)
            # the whole longest literal part, or its end (the fix it names) where a test checks the API
            # wording and the CLI's ending separately
            quoted |= message.startswith(("<", "click's")) or longest.strip() in text or longest[-25:] in text
        if not quoted:
            problems.append(f"none of {tests} quotes {message!r}")
    assert not problems, "\n".join(problems)


# --- the lines the error boundary writes itself --------------------------------------------

# Runs `reshard convert` and sends itself SIGINT (Ctrl-C) just before layers.00001 is renamed
# into place: half the work is done, the rest must be redone by the next run.
INTERRUPTER = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even where started with SIGINT ignored
real_replace = os.replace
def replace(src, dst):
    if os.path.basename(dst) == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGINT)
    real_replace(src, dst)
os.replace = replace
from reshard.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_interrupted_convert_exits_130_and_resumes(tiny_checkpoints, tiny_converted, tmp_path):
    from reshard.cli import main as reshard_main
    from test_robustness import assert_same_files

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", INTERRUPTER, "layers.00001.safetensors", "convert",
                           str(tiny_checkpoints["llama"]), str(out), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == "Error: interrupted; run the same command again to resume"
    assert "Traceback" not in proc.stderr
    assert not (out / "manifest.json").exists()
    assert reshard_main(["convert", str(tiny_checkpoints["llama"]), str(out), "--quiet"]) == 0
    assert_same_files(out, tiny_converted["llama"])


# Runs `runtime generate` and sends itself SIGINT while the second group is being read.
GENERATE_INTERRUPTER = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even where started with SIGINT ignored
from runtime.stream import GroupLoader
real_load, calls = GroupLoader.load, []
def load(self, i):
    calls.append(i)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return real_load(self, i)
GroupLoader.load = load
from runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_interrupted_generate_exits_130(tiny_converted):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", GENERATE_INTERRUPTER, "generate", str(tiny_converted["llama"]),
                           "--prompt", "w5 w6", "--max-new-tokens", "4", "--device", "cpu", "--max-cpu-memory", "0"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == "Error: interrupted"
    assert "Traceback" not in proc.stderr


def test_missing_input_file(tiny_converted, tmp_path, capsys):
    from runtime.cli import main as runtime_main
    from test_robustness import only_error

    missing = tmp_path / "nowhere.jsonl"
    code = runtime_main(["score", str(tiny_converted["llama"]), str(missing), "--output", str(tmp_path / "o.jsonl"),
                         "--device", "cpu", "--max-cpu-memory", "0"])
    assert (code, only_error(capsys.readouterr().err)) == (1, f"Error: No such file or directory: {missing}")


def test_unexpected_error(tiny_converted, monkeypatch, capsys):
    import reshard.verify
    from reshard.cli import main as reshard_main
    from test_robustness import only_error

    def boom(*args, **kwargs):
        raise RuntimeError("something nobody expected\nsecond line")

    monkeypatch.setattr(reshard.verify, "check_group_file", boom)
    code = reshard_main(["verify", str(tiny_converted["llama"])])
    assert (code, only_error(capsys.readouterr().err)) == (
        1, "Error: RuntimeError: something nobody expected (set RESHARD_DEBUG=1 for the traceback)")


def test_prompt_of_no_tokens_is_a_usage_error(tiny_converted, tmp_path, capsys):
    from runtime.cli import main as runtime_main
    from test_robustness import only_error

    common = ["--device", "cpu", "--max-cpu-memory", "0", "-n", "2"]
    folder = str(tiny_converted["llama"])
    code = runtime_main(["generate", folder, "-p", " ", *common])
    assert (code, only_error(capsys.readouterr().err)) == (
        2, "Error: the prompt encodes to no tokens (only whitespace?); pass some text")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "w3 w4"}\n{"prompt": " "}\n', encoding="utf-8")
    code = runtime_main(["generate", folder, "--prompts-file", str(prompts), *common])
    assert (code, only_error(capsys.readouterr().err)) == (
        2, f"Error: {prompts} line 2: the prompt encodes to no tokens (only whitespace?); pass some text")


def test_runtime_folder_with_custom_code_needs_trust_remote_code(tiny_converted, tmp_path, capsys):
    import shutil
    from runtime.cli import main as runtime_main
    from test_robustness import only_error, plant_custom_code

    folder = tmp_path / "custom"
    shutil.copytree(tiny_converted["llama"], folder)
    marker = plant_custom_code(folder, tmp_path / "pwned")
    code = runtime_main(["generate", str(folder), "-p", "w3", "-n", "1", "--device", "cpu", "--max-cpu-memory", "0"])
    assert (code, only_error(capsys.readouterr().err)) == (
        1, f"Error: {folder} needs its own Python code to load; pass --trust-remote-code if you trust it")
    assert not marker.exists()
