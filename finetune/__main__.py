"""`python -m finetune` / `accelerate launch -m finetune`: see finetune/train.py."""
from finetune.train import main

if __name__ == "__main__":
    raise SystemExit(main())
