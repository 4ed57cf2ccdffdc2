"""This machine's kernel: memory cgroups and /proc readings, hibernation, who listens
on a port, state files."""
