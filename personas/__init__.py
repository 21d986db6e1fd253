"""Simulated users: the ISCO-800 backgrounds (shipped, imported or LLM-generated).

Main entry points: `personas.catalog.PersonaCatalog` (load, filter, search) and the
records in `personas.records` (`Persona`, `Traits`).
"""
