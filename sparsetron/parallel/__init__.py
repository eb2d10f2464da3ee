"""How work is split: context parallelism (``context``), expert parallelism (``expert``), data parallelism (``data``)."""
