"""`diffucode tune`: coupled-GRPO on the user's repository, its tests as the reward, LoRA adapters
the daemon serves (issue 18). Uses the engine; knows nothing of sockets or the editor."""
