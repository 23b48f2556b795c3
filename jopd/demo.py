"""python -m jopd.demo: the whole pipeline on a CPU (not yet implemented; see issue 7)."""
import sys

if __name__ == "__main__":
  print("jopd.demo: not yet implemented (the demo issue has not landed yet)", file=sys.stderr)
  sys.exit(2)
