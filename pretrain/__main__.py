"""`python -m pretrain` / `accelerate launch -m pretrain`: see pretrain/train.py."""
from pretrain.train import main

if __name__ == "__main__":
    raise SystemExit(main())
