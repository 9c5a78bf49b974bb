"""The procedural shapes dataset the embedded model is trained on, and the scorer that reads images back."""
from .dataset import (COLOURS, PALETTE, POSITIONS, SHAPES, SIZES, Attributes, caption,  # noqa: F401
                      held_out_attributes, held_out_prompts, is_held_out, parse_caption, render,
                      sample, training_combinations)
from .scorer import adherence, read_attributes, score  # noqa: F401
