"""VixDiskLib's public C API as vmrestore uses it: declarations only, no logic.

This is the one table of VixDiskLib functions. ``generate.py`` turns it into
  * ``src/vmrestore/_vixdisklib.py``: the cffi ABI-mode cdef and the table as
    data (the Python face checks the loaded library against it and reports
    what it offers), and
  * ``ext/vixdisklib/vixdisklib.h``: the same types for C plus an X-macro list
    of the functions, which ext/vddk_sim implements and the core's VDDK writer
    turns into function-pointer types.

Written from VMware's documented public API (VDDK programming guide,
vixDiskLib.h as published). Layouts follow VDDK 7.0; older libraries read a
prefix of the structs we allocate, so a larger struct is safe to pass.
Edit this file, then run ``python ext/vixdisklib/generate.py`` (the build and
a test do it too).
"""

from __future__ import annotations

from typing import NamedTuple

# Types and constants shared by C and cffi. ``VMR_VA_LIST`` becomes ``va_list``
# in C and ``void *`` for cffi (which cannot declare va_list; on x86-64 a
# va_list argument is passed as a pointer, and vmrestore passes NULL loggers).
TYPES = r"""
typedef uint64_t VixError;
typedef uint64_t VixDiskLibSectorType;
typedef char Bool;

#define VIX_OK 0
#define VIX_E_FAIL 1
#define VIX_E_OUT_OF_MEMORY 2
#define VIX_E_INVALID_ARG 3
#define VIX_E_FILE_NOT_FOUND 4
#define VIX_E_OBJECT_IS_BUSY 5
#define VIX_E_NOT_SUPPORTED 6
#define VIX_E_FILE_ERROR 7
#define VIX_E_DISK_FULL 8
#define VIX_E_FILE_READ_ONLY 11
#define VIX_E_FILE_ACCESS_ERROR 13
#define VIX_E_FILE_ALREADY_LOCKED 15
#define VIX_E_OBJECT_NOT_FOUND 25
#define VIX_E_HOST_NOT_CONNECTED 26
#define VIX_E_AUTHENTICATION_FAIL 35
#define VIX_E_HOST_CONNECTION_LOST 36
#define VIX_E_INVALID_HANDLE 1000
#define VIX_E_VM_NOT_FOUND 4000
#define VIX_E_HOST_TCP_CONN_LOST 14011
#define VIX_E_DISK_INVAL 16000
#define VIX_E_DISK_NOIO 16002
#define VIX_E_DISK_OUTOFRANGE 16007
#define VIX_E_DISK_CAPACITY_MISMATCH 16067
#define VIX_ASYNC 25000
#define VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED 26000
#define VIX_E_NET_HTTP_SSL_SECURITY 30201

#define VIXDISKLIB_SECTOR_SIZE 512
#define VIXDISKLIB_MIN_CHUNK_SIZE 128
#define VIXDISKLIB_MAX_CHUNK_NUMBER 524288

#define VIXDISKLIB_FLAG_OPEN_UNBUFFERED 1
#define VIXDISKLIB_FLAG_OPEN_SINGLE_LINK 2
#define VIXDISKLIB_FLAG_OPEN_READ_ONLY 4
#define VIXDISKLIB_FLAG_OPEN_COMPRESSION_ZLIB 16
#define VIXDISKLIB_FLAG_OPEN_COMPRESSION_FASTLZ 32
#define VIXDISKLIB_FLAG_OPEN_COMPRESSION_SKIPZ 64

typedef enum {
    VIXDISKLIB_CRED_UID = 1,
    VIXDISKLIB_CRED_SESSIONID = 2,
    VIXDISKLIB_CRED_TICKETID = 3,
    VIXDISKLIB_CRED_SSPI = 4,
    VIXDISKLIB_CRED_UNKNOWN = 256
} VixDiskLibCredType;

typedef enum {
    VIXDISKLIB_SPEC_VMX = 0,
    VIXDISKLIB_SPEC_VSTORAGE_OBJECT = 1,
    VIXDISKLIB_SPEC_UNKNOWN = 2
} VixDiskLibSpecType;

typedef enum {
    VIXDISKLIB_ADAPTER_IDE = 1,
    VIXDISKLIB_ADAPTER_SCSI_BUSLOGIC = 2,
    VIXDISKLIB_ADAPTER_SCSI_LSILOGIC = 3,
    VIXDISKLIB_ADAPTER_UNKNOWN = 256
} VixDiskLibAdapterType;

typedef struct {
    char *id;
    char *datastoreMoRef;
    char *ssId;
} VixDiskLibVStorageObjectSpec;

typedef struct {
    char *userName;
    char *password;
} VixDiskLibUidPasswdCreds;

typedef struct {
    char *cookie;
    char *userName;
    char *key;
} VixDiskLibSessionIdCreds;

typedef struct {
    char *vmxSpec;
    char *serverName;
    char *thumbPrint;
    long privateUse;
    VixDiskLibCredType credType;
    union {
        VixDiskLibUidPasswdCreds uid;
        VixDiskLibSessionIdCreds sessionId;
        void *ticketId;
    } creds;
    uint32_t port;
    uint32_t nfcHostPort;
    char *vimApiVer;
    char reserved[8];
    void *reserved2;
    union {
        VixDiskLibVStorageObjectSpec vStorageObjSpec;
    } spec;
    VixDiskLibSpecType specType;
} VixDiskLibConnectParams;

typedef struct {
    uint32_t cylinders;
    uint32_t heads;
    uint32_t sectors;
} VixDiskLibGeometry;

typedef struct {
    VixDiskLibGeometry biosGeo;
    VixDiskLibGeometry physGeo;
    VixDiskLibSectorType capacity;
    VixDiskLibAdapterType adapterType;
    int numLinks;
    char *parentFileNameHint;
    char *uuid;
    uint32_t logicalSectorSize;
    uint32_t physicalSectorSize;
} VixDiskLibInfo;

typedef struct {
    VixDiskLibSectorType offset;
    VixDiskLibSectorType length;
} VixDiskLibBlock;

typedef struct {
    uint32_t numBlocks;
    VixDiskLibBlock blocks[1];
} VixDiskLibBlockList;

typedef struct VixDiskLibConnectParam *VixDiskLibConnection;
typedef struct VixDiskLibHandleStruct *VixDiskLibHandle;

typedef void VixDiskLibGenericLogFunc(const char *fmt, VMR_VA_LIST args);
typedef void (*VixDiskLibCompletionCB)(void *cbData, VixError result);
"""


class Function(NamedTuple):
    """One VixDiskLib entry point: C signature, whether a load needs it, since when."""

    name: str
    restype: str
    params: str
    required: bool
    since: str  # VDDK version that added it
    purpose: str


_F = Function

# Required: present in every VDDK vmrestore supports (5.5 and later); a library
# lacking one is refused at load. Optional: newer calls; a library lacking one
# loads, and the operation that needs it says which call is missing.
FUNCTIONS: tuple[Function, ...] = (
    _F("VixDiskLib_InitEx", "VixError",
       "uint32_t majorVersion, uint32_t minorVersion, VixDiskLibGenericLogFunc *log, "
       "VixDiskLibGenericLogFunc *warn, VixDiskLibGenericLogFunc *panic, "
       "const char *libDir, const char *configFile",
       True, "5.0", "initialize the library (once per process)"),
    _F("VixDiskLib_Exit", "void", "void", True, "5.0", "release the library"),
    _F("VixDiskLib_ListTransportModes", "const char *", "void",
       True, "5.0", "transport modes this library knows"),
    _F("VixDiskLib_Cleanup", "VixError",
       "const VixDiskLibConnectParams *connectParams, uint32_t *numCleanedUp, "
       "uint32_t *numRemaining",
       True, "5.0", "undo state left by an unclean shutdown"),
    _F("VixDiskLib_ConnectEx", "VixError",
       "const VixDiskLibConnectParams *connectParams, Bool readOnly, "
       "const char *snapshotRef, const char *transportModes, "
       "VixDiskLibConnection *connection",
       True, "5.0", "connect to vCenter/ESXi (or local files) with a transport list"),
    _F("VixDiskLib_Disconnect", "VixError", "VixDiskLibConnection connection",
       True, "5.0", "close a connection"),
    _F("VixDiskLib_PrepareForAccess", "VixError",
       "const VixDiskLibConnectParams *connectParams, const char *identity",
       True, "5.0", "tell the host a VM's disks are about to be opened"),
    _F("VixDiskLib_EndAccess", "VixError",
       "const VixDiskLibConnectParams *connectParams, const char *identity",
       True, "5.0", "re-enable the operations PrepareForAccess disabled"),
    _F("VixDiskLib_Open", "VixError",
       "const VixDiskLibConnection connection, const char *path, uint32_t flags, "
       "VixDiskLibHandle *diskHandle",
       True, "5.0", "open a virtual disk"),
    _F("VixDiskLib_Close", "VixError", "VixDiskLibHandle diskHandle",
       True, "5.0", "close a virtual disk"),
    _F("VixDiskLib_GetInfo", "VixError",
       "VixDiskLibHandle diskHandle, VixDiskLibInfo **info",
       True, "5.0", "geometry, capacity, adapter, links, uuid"),
    _F("VixDiskLib_FreeInfo", "void", "VixDiskLibInfo *info",
       True, "5.0", "free GetInfo's result"),
    _F("VixDiskLib_GetTransportMode", "const char *", "VixDiskLibHandle diskHandle",
       True, "5.0", "transport mode an open disk uses"),
    _F("VixDiskLib_Read", "VixError",
       "VixDiskLibHandle diskHandle, VixDiskLibSectorType startSector, "
       "VixDiskLibSectorType numSectors, uint8_t *readBuffer",
       True, "5.0", "synchronous read of whole sectors"),
    _F("VixDiskLib_Write", "VixError",
       "VixDiskLibHandle diskHandle, VixDiskLibSectorType startSector, "
       "VixDiskLibSectorType numSectors, const uint8_t *writeBuffer",
       True, "5.0", "synchronous write of whole sectors"),
    _F("VixDiskLib_GetErrorText", "char *", "VixError err, const char *locale",
       True, "5.0", "text of an error code (free with FreeErrorText)"),
    _F("VixDiskLib_FreeErrorText", "void", "char *errMsg",
       True, "5.0", "free GetErrorText's result"),
    _F("VixDiskLib_FreeConnectParams", "void", "VixDiskLibConnectParams *connectParams",
       True, "5.5", "free connect params the library allocated"),
    _F("VixDiskLib_Flush", "VixError", "VixDiskLibHandle diskHandle",
       False, "6.0", "flush written data to the disk"),
    _F("VixDiskLib_ReadAsync", "VixError",
       "VixDiskLibHandle diskHandle, VixDiskLibSectorType startSector, "
       "VixDiskLibSectorType numSectors, uint8_t *readBuffer, "
       "VixDiskLibCompletionCB callback, void *cbData",
       False, "6.0", "queue a read; callback(cbData, result) on completion"),
    _F("VixDiskLib_WriteAsync", "VixError",
       "VixDiskLibHandle diskHandle, VixDiskLibSectorType startSector, "
       "VixDiskLibSectorType numSectors, const uint8_t *writeBuffer, "
       "VixDiskLibCompletionCB callback, void *cbData",
       False, "6.0", "queue a write; callback(cbData, result) on completion"),
    _F("VixDiskLib_Wait", "VixError", "VixDiskLibHandle diskHandle",
       False, "6.5", "wait for every queued async request of a disk"),
    _F("VixDiskLib_QueryAllocatedBlocks", "VixError",
       "VixDiskLibHandle diskHandle, VixDiskLibSectorType startSector, "
       "VixDiskLibSectorType numSectors, VixDiskLibSectorType chunkSize, "
       "VixDiskLibBlockList **blockList",
       False, "6.7", "allocated chunks of a disk range"),
    _F("VixDiskLib_FreeBlockList", "VixError", "VixDiskLibBlockList *blockList",
       False, "6.7", "free QueryAllocatedBlocks' result"),
    _F("VixDiskLib_AllocateConnectParams", "VixDiskLibConnectParams *", "void",
       False, "6.7", "connect params sized by the library itself"),
)

# Which optional calls each vmrestore operation needs (the face checks these
# before starting, so an old library fails up front, naming the call).
NEEDS: dict[str, tuple[str, ...]] = {
    "async-write": ("VixDiskLib_WriteAsync", "VixDiskLib_Wait", "VixDiskLib_Flush"),
    "async-read": ("VixDiskLib_ReadAsync", "VixDiskLib_Wait"),
    "allocated-blocks": ("VixDiskLib_QueryAllocatedBlocks", "VixDiskLib_FreeBlockList"),
    "flush": ("VixDiskLib_Flush",),
}
