"""dgbench: a DomainBed-style domain-generalization benchmark."""

__version__ = "0.1.0"
