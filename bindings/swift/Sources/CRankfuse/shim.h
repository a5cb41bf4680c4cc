/* The installed C header (its directory comes from `pkg-config --cflags rankfuse`). */
#include <rankfuse.h>
