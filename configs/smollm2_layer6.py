"""The embedded SmolLM2-135M-Instruct at an earlier layer, with a larger dictionary: a CPU run in minutes.

    python run_pipeline.py configs/smollm2_layer6.py
"""
LAYER_IDX = 6
M = 512
K = 16
RUN_NAME = "smollm2_layer6"
OUTPUT_DIR = "activations"
