"""The procedural shapes dataset the embedded model is trained on, and the scorer that reads images back."""
from .dataset import (COLOURS, PALETTE, POSITIONS, SHAPES, SIZES, Attributes, caption,
                      held_out_attributes, held_out_prompts, is_held_out, parse_caption, render,
                      sample, training_combinations)
from .scorer import adherence, read_attributes, score

__all__ = ["COLOURS", "PALETTE", "POSITIONS", "SHAPES", "SIZES", "Attributes", "caption",
           "held_out_attributes", "held_out_prompts", "is_held_out", "parse_caption", "render",
           "sample", "training_combinations", "adherence", "read_attributes", "score"]
