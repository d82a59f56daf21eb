"""Client tools shipped with dicomflow (not feeders): the C-STORE SCU behind ``dicomflow send``."""
