"""python -m slowmo_train ... (what torchrun runs with -m)."""

from slowmo_train.cli import main

if __name__ == "__main__":
    main()
