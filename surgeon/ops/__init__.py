"""Operations over canonical adapters and checkpoints; none of them knows about file formats."""
