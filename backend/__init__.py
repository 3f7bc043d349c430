"""safetrain: a fine-tuning service and its memory-safe trainer."""

from backend.library_noise import silence_library_noise

silence_library_noise()  # before any module of the package imports bitsandbytes or peft
