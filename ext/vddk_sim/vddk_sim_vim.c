/* vddk_sim's companion library, libvixDiskLibVim.so.8.
 *
 * VMware's libvixDiskLib loads companion libraries of its own by name at run
 * time, so they are found only through the library search path
 * (LD_LIBRARY_PATH naming the VDDK's lib64, or already loaded). vddk_sim does
 * the same with this one: InitEx dlopens "libvixDiskLibVim.so.8" and calls
 * VixDiskLibVim_Version(); without it InitEx fails as VMware's does
 * (docs/vddk.md, "Library search path").
 */
#define API __attribute__((visibility("default")))

API int VixDiskLibVim_Version(void);

API int VixDiskLibVim_Version(void)
{
    return 8;
}
