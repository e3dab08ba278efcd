"""train_gpt_v2.py: the research trainer. It extends train_gpt.py by import, never by copy.

Today it runs train_gpt.py's stack unchanged (same knobs, same defaults); the wider ablation
surface lands here as registered extensions whose defaults leave the record stack as it is.
"""
import train_gpt
from golf import dist

if __name__ == "__main__":
    dist.run_main(train_gpt.main)
